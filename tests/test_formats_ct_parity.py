"""Bit parity with compressed-tensors' own arithmetic (the installed package is the reference).

- NVFP4: the per-tensor global scale is what `generate_gparam` gives (it evaluates `448*6/amax`
  as `amax.reciprocal() * 2688`, 1 ulp from the correctly rounded quotient for ~1/4 of values),
  then block scales, codes and fake-quantized values, on many seeds and magnitudes.
- Asymmetric int: codes are `clamp(round(w/s + z))` (the zero point added before rounding), which
  picks another code than `round(w/s) + z` at exact ties with an odd zero point: hand-built tie
  tensors plus many random seeds, against CT's `quantize` / `fake_quantize` / `calculate_qparams`.
"""
import pytest
import torch

from alphaquant.formats import QParams, get_format

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402

NV_ARGS = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                           scale_dtype=torch.float8_e4m3fn)


def _ct_nvfp4(w):
    gs = generate_gparam(w.amin(), w.amax())
    wg = w.unflatten(-1, (w.shape[-1] // 16, 16))
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), NV_ARGS, global_scale=gs)
    return gs, scale


def test_nvfp4_global_scale_is_generate_gparam_on_many_amax():
    """2000 amax values over 12 binades: the division and the reciprocal differ for a good share of
    them (so the test can tell the two conventions apart), and ours equals CT's on every one."""
    g = torch.Generator().manual_seed(0)
    amax = torch.exp2(torch.empty(2000).uniform_(-8, 4, generator=g))
    fmt = get_format("nvfp4")
    ours = torch.stack([fmt.params(torch.stack([a, -a / 3]).reshape(1, 2).repeat(1, 8))
                        .extra["weight_global_scale"].reshape(()) for a in amax])
    ct = torch.stack([generate_gparam(-a / 3, a).reshape(()) for a in amax])
    assert torch.equal(ours, ct)
    differs = (torch.full((), 2688.0) / amax != ct).float().mean().item()
    assert 0.05 < differs < 0.6, differs        # the correctly rounded quotient is another number


@pytest.mark.parametrize("seed", range(24))
def test_nvfp4_matches_compressed_tensors_many_seeds(seed):
    g = torch.Generator().manual_seed(100 + seed)
    mag = 10 ** torch.empty(1).uniform_(-3, 1, generator=g).item()
    w = torch.randn(16, 128, generator=g) * mag
    gs, scale = _ct_nvfp4(w)
    fmt = get_format("nvfp4")
    p = fmt.params(w)
    assert torch.equal(p.extra["weight_global_scale"].reshape(1), gs)
    assert torch.equal(p.extra["block_scale_fp8"].float(), scale.float())
    assert torch.equal(fmt.fake_quantize(w), fake_quantize(w, scale, None, NV_ARGS, global_scale=gs))


def _int_args(bits, group, sym):
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if group == -1 else "group",
                            group_size=None if group == -1 else group, scale_dtype=torch.float16)


def test_asym_ties_with_odd_zero_follow_compressed_tensors():
    """w/s = k + 1/2 exactly, zero point odd: round(w/s + z) and round(w/s) + z give different codes."""
    fmt = get_format("int4", group_size=8, sym=False)
    s = torch.tensor([[0.25]])
    z = torch.tensor([[-3.0]])                           # odd
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5])
    w = (halves * 0.25).reshape(1, 8)                    # exact in float32: w / s == halves
    ours = fmt.encode(w, QParams(s, z))
    ct = quantize(w, s, z.to(torch.int8), _int_args(4, 8, False), dtype=torch.int8)
    assert torch.equal(ours, ct)
    other = (torch.round(halves) + z).clamp(-8, 7).to(torch.int8).reshape(1, 8)
    assert (ours != other).all()                         # the tensor really holds ties of that kind
    assert torch.equal(fmt.round_with(w, QParams(s, z)), fake_quantize(w, s, z.to(torch.int8), _int_args(4, 8, False)))


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 32), (4, -1), (8, 64)])
@pytest.mark.parametrize("seed", range(4))
def test_asym_int_matches_compressed_tensors_many_seeds(bits, group, seed):
    """Random weights plus a block of exact half-step values against the chosen params."""
    g = torch.Generator().manual_seed(1000 * bits + seed)
    w = torch.randn(12, 128, generator=g) * 0.03
    w[2] = w[2].abs() + 0.01                            # one-signed rows: zero at the range end
    fmt = get_format(f"int{bits}", group_size=group, sym=False)
    args = _int_args(bits, group, False)
    gl = 128 if group == -1 else group
    wg = w.unflatten(-1, (128 // gl, gl))
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    p = fmt.params(w)
    assert torch.equal(p.scale, scale.float()) and torch.equal(p.zero, zp.float())
    # rows 6..11 become exact ties k + 1/2 of their own group's scale
    steps = (torch.randint(-2 ** bits, 2 ** bits, (6, 128), generator=g) + 0.5)
    w[6:] = steps * p.scale[6:].repeat_interleave(gl, -1)
    assert torch.equal(fmt.encode(w, p), quantize(w, scale, zp, args, dtype=torch.int8))
    assert torch.equal(fmt.round_with(w, p), fake_quantize(w, scale, zp, args))
