"""Integer formats against a plain reference and against compressed-tensors itself."""
import pytest
import torch

from alphaquant.formats import FormatError, get_format


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ref_int(w, bits, group, sym, scale_dtype=torch.float16):
    """Straightforward per-group loop over rows and groups (slow, obviously correct)."""
    R, C = w.shape
    g = C if group == -1 else group
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for r in range(R):
        for s in range(0, C, g):
            v = w[r, s:s + g].double()
            lo, hi = min(v.min().item(), 0.0), max(v.max().item(), 0.0)
            if sym:
                raw = max(abs(lo), abs(hi)) / ((2 ** bits - 1) / 2)
                zero = 0.0
            else:
                raw = (hi - lo) / (2 ** bits - 1)
                zero = min(max(qmin - round(torch.tensor(lo / raw, dtype=torch.float32).item()), qmin), qmax)
            scale = torch.tensor(raw, dtype=torch.float32).to(scale_dtype).float()
            if scale == 0:
                scale = torch.tensor(torch.finfo(scale_dtype).eps)
            codes = torch.clamp(torch.round(w[r, s:s + g] / scale) + zero, qmin, qmax)
            out[r, s:s + g] = (codes - zero) * scale
    return out


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 128, False), (8, -1, True),
                                            (3, 32, False), (2, 64, True), (5, 16, True)])
def test_int_matches_plain_reference(bits, group, sym):
    w = torch.randn(6, 256, generator=_gen(bits)) * 0.05
    w[0, :group if group > 0 else 256] += 0.3     # a group with only positive values (asym path)
    fmt = get_format(f"int{bits}", group_size=group, sym=sym)
    ref = ref_int(w, bits, group, sym)
    # The reference forms the scale in float64 before rounding it to float16; that can only
    # differ from float32 arithmetic right at a float16 rounding boundary, which random data misses.
    assert torch.equal(fmt.fake_quantize(w), ref)


def test_symmetric_codes_and_clamp():
    fmt = get_format("int4", group_size=4)
    w = torch.tensor([[-1.0, 0.5, 0.25, 1.0]])   # amax 1 -> scale 1/7.5 (fp16-rounded)
    q = fmt.quantize(w)
    assert q.params.zero is None
    # -1/scale = -7.5 -> round half even -8 (in range); +1 -> 8 -> clamped to 7
    assert q.codes.tolist() == [[-8, 4, 2, 7]]
    assert q.codes.dtype == torch.int8


def test_ties_round_to_even():
    fmt = get_format("int8", group_size=-1)
    scale = torch.tensor([[0.5]])
    from alphaquant.formats import QParams
    w = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75]])    # x/scale = .5, 1.5, 2.5, -.5, -1.5
    assert fmt.encode(w, QParams(scale)).tolist() == [[0, 2, 2, 0, -2]]


def test_zero_group_is_safe():
    for sym in (True, False):
        fmt = get_format("int4", group_size=8, sym=sym)
        w = torch.zeros(2, 16)
        w[1, 8:] = torch.linspace(-1, 1, 8)
        p = fmt.params(w)
        assert (p.scale > 0).all()
        out = fmt.fake_quantize(w)
        assert torch.equal(out[0], torch.zeros(16)) and torch.equal(out[1, :8], torch.zeros(8))


def test_asym_zero_is_signed_and_range_includes_zero():
    fmt = get_format("int4", group_size=8, sym=False)
    w = torch.linspace(1.0, 2.0, 8)[None]         # min > 0: range extended down to 0
    p = fmt.params(w)
    assert p.zero.item() == -8                    # qmin - round(0 / scale)
    assert torch.equal(p.scale, torch.tensor([[2.0 / 15]]).half().float())


def test_scale_stored_in_scale_dtype():
    w = torch.randn(4, 64, generator=_gen(3))
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        p = get_format("int4", group_size=32, scale_dtype=dt).params(w)
        assert torch.equal(p.scale.to(dt).float(), p.scale)


def test_nan_inf_raise():
    fmt = get_format("int4")
    for bad in (float("nan"), float("inf")):
        w = torch.randn(2, 128)
        w[1, 3] = bad
        with pytest.raises(FormatError, match="NaN/Inf"):
            fmt.params(w)
        with pytest.raises(FormatError, match="NaN/Inf"):
            fmt.quantize(w)


def test_not_divisible_group_raises():
    with pytest.raises(FormatError, match="not divisible by group_size 128"):
        get_format("int4", group_size=128).params(torch.randn(4, 200))


# --- compressed-tensors as an independent reference -------------------------------------
ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 128, False), (8, -1, True)])
def test_int_matches_compressed_tensors(bits, group, sym):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = torch.randn(16, 512, generator=_gen(bits + sym)) * 0.02
    w[3, :128] = w[3, :128].abs()                  # one-signed group for the asymmetric zero
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                            strategy="channel" if group == -1 else "group",
                            group_size=None if group == -1 else group, scale_dtype=torch.float16)
    g = 512 if group == -1 else group
    wg = w.unflatten(-1, (512 // g, g))
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)          # [16, G]
    fmt = get_format(f"int{bits}", group_size=group, sym=sym)
    p = fmt.params(w)
    assert torch.equal(p.scale, scale.float())
    if sym:
        assert p.zero is None
    else:
        assert torch.equal(p.zero, zp.float())
    ct_zp = zp if not sym else None
    ours = fmt.fake_quantize(w)
    assert torch.equal(ours, fake_quantize(w, scale, ct_zp, args))
    codes = quantize(w, scale, ct_zp, args, dtype=torch.int8)
    assert torch.equal(fmt.quantize(w).codes, codes)
    assert torch.equal(dequantize(codes, scale, ct_zp, args), ours)
