"""MX formats: E8M0 shared exponent per the OCP formula, element rounding, NaN scale, MXINT8."""
import math

import pytest
import torch

from alphaquant.formats import FormatError, get_format
from alphaquant.formats.mx import MXFormat

EMAX = {"mxfp4": 2, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4, "mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxint8": 0}
MAXV = {"mxfp4": 6.0, "mxfp6_e2m3": 7.5, "mxfp6_e3m2": 28.0, "mxfp8_e4m3": 448.0,
        "mxfp8_e5m2": 57344.0, "mxint8": 127 / 64}


def _block(amax, n=32):
    b = torch.zeros(n)
    b[0], b[5] = amax, -amax / 3
    return b[None]                                              # [1, 32]


@pytest.mark.parametrize("name", list(EMAX))
@pytest.mark.parametrize("amax", [1.0, 0.9999, 6.0, 7.9, 8.0, 3e-3, 1234.5, 2.0 ** -100, 2.0 ** 100])
def test_shared_exponent_spec_formula(name, amax):
    p = get_format(name).params(_block(amax))
    expect = math.floor(math.log2(amax)) - EMAX[name]           # the spec, in float64
    assert p.extra["scale_e8m0"].item() == expect + 127
    assert p.scale.item() == 2.0 ** expect


@pytest.mark.parametrize("name", list(EMAX))
@pytest.mark.parametrize("amax", [1.0, 6.0, 7.0, 7.5, 7.9, 28.5, 450.0, 3e-3])
def test_ceil_mode_never_clips(name, amax):
    fmt = get_format(name, scale_mode="ceil")
    s = fmt.params(_block(amax)).scale.item()
    assert amax / s <= MAXV[name]
    assert amax / (s / 2) > MAXV[name]                          # and is the smallest such scale


def test_e8m0_range_clamp_and_zero_block():
    fmt = get_format("mxfp4")
    w = torch.cat([torch.zeros(1, 32), _block(2.0 ** -140), _block(2.0 ** 127)])
    codes = fmt.params(w).extra["scale_e8m0"].flatten().tolist()
    assert codes == [0, 0, 127 + 125]                           # amax 0 -> smallest scale 2^-127
    assert torch.equal(fmt.fake_quantize(torch.zeros(2, 64)), torch.zeros(2, 64))


def test_floor_mode_saturates_block_max():
    # amax 7.9 with E2M1: X = 2^(2-2) = 1, 7.9 saturates to 6 (spec behaviour)
    out = get_format("mxfp4").fake_quantize(_block(7.9))
    assert out[0, 0].item() == 6.0
    assert get_format("mxfp4", scale_mode="ceil").fake_quantize(_block(7.9))[0, 0].item() == 8.0


def test_e8m0_nan_code_dequantizes_to_nan():
    fmt = get_format("mxfp4")
    w = torch.randn(2, 64)
    q = fmt.quantize(w)
    codes = q.params.extra["scale_e8m0"].clone()
    codes[1, 0] = 0xFF
    q.params = MXFormat.params_from_e8m0(codes)
    out = fmt.dequantize(q)
    assert torch.isnan(out[1, :32]).all() and torch.isfinite(out[1, 32:]).all()
    assert torch.isfinite(out[0]).all()


def test_nan_inf_weights_raise():
    w = torch.randn(2, 64)
    w[0, 1] = float("nan")
    with pytest.raises(FormatError, match="NaN/Inf"):
        get_format("mxfp8").params(w)


def _table(name):
    """Positive element values, written independently of floatgrid (the 3 small ones literal)."""
    if name == "mxint8":
        return [k / 64 for k in range(128)]
    if name == "mxfp4":
        return [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    if name == "mxfp6_e2m3":
        return [i / 8 for i in range(16)] + [2 + i / 4 for i in range(8)] + [4 + i / 2 for i in range(8)]
    if name == "mxfp6_e3m2":
        return [0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1,
                1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28]
    dt = torch.float8_e4m3fn if name == "mxfp8_e4m3" else torch.float8_e5m2
    v = torch.arange(128, dtype=torch.uint8).view(dt).float()
    return torch.unique(v[torch.isfinite(v)]).tolist()


def ref_mx(w, name, g=32):
    """Slow reference: per block, X from the spec formula, nearest table value (no ties in
    random data), saturating."""
    pos = torch.tensor(_table(name), dtype=torch.float64)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            v = w[r, s:s + g].double()
            amax = v.abs().max().item()
            e = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - EMAX[name]))
            x = (v / 2.0 ** e).abs().clamp(max=pos[-1].item())
            idx = (x[:, None] - pos[None]).abs().argmin(-1)
            out[r, s:s + g] = (pos[idx] * torch.sign(v) * 2.0 ** e).float()
    return out


@pytest.mark.parametrize("name", list(EMAX))
@pytest.mark.parametrize("group", [32, 64])
def test_mx_matches_slow_reference(name, group):
    g = torch.Generator().manual_seed(len(name) + group)
    w = torch.randn(4, 128, generator=g) * torch.logspace(-3, 2, 4)[:, None]
    fmt = get_format(name, group_size=group)
    assert torch.equal(fmt.fake_quantize(w), ref_mx(w, name, group))


def test_mxint8_codes_are_k():
    fmt = get_format("mxint8")
    w = torch.tensor([[1.0, 0.5, -1.0 / 64, 1.984375] + [0.0] * 28])
    q = fmt.quantize(w)
    assert q.params.scale.item() == 1.0
    assert q.codes[0, :4].tolist() == [64, 32, -1, 127] and q.codes.dtype == torch.int8


def test_aliases():
    assert get_format("mxfp6").name == "mxfp6_e2m3"
    assert get_format("mxfp8").name == "mxfp8_e4m3"
    assert get_format("mxfp6", group_size=64).group_size == 64


@pytest.mark.parametrize("name", list(EMAX))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_activation_block_is_nan_when_unchecked(name, bad):
    """check_finite=False (activations): a NaN/Inf makes its block's scale 0xFF and all 32 values NaN
    (OCP MX: a NaN scale; microxcaling and torchao alike), never a finite scale with zeroed neighbours;
    the other blocks are what they are when quantized alone."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 96, generator=g)
    w[1, 40] = bad
    fmt = get_format(name, check_finite=False)
    p = fmt.params(w)
    assert p.extra["scale_e8m0"][1, 1].item() == 0xFF
    out = fmt.round_with(w, p)
    assert torch.isnan(out[1, 32:64]).all()
    alone = get_format(name).fake_quantize(torch.cat([w[1, :32], w[1, 64:]])[None])
    assert torch.equal(torch.cat([out[1, :32], out[1, 64:]])[None], alone)
    assert torch.equal(out[0], get_format(name).fake_quantize(w[:1])[0])
