"""Export layouts at the tensor level (alphaquant/export/compressed.py, qconfig.py).

1. compress -> decompress is bit-identical to the dequantized weight, for every format.
2. pack_int32 / unpack_int32 against a plain bit-loop reference.
3. Weights off the grid of their params are refused.
4. The independent reader: the compressed-tensors package decompresses our tensors, with the
   config group parsed from our quantization_config, to exactly our dequantized weights.
"""
from __future__ import annotations

import pytest
import torch

from alphaquant.export.compressed import (AQ_PACKED, compress, decompress, layout_of, pack_int32,
                                          unpack_int32)
from alphaquant.export.qconfig import quantization_config
from alphaquant.config.recipe import QuantSpec, build_format

R, C = 24, 128


def spec(wq, g, sym=True):
    return QuantSpec(wq=wq, group_size=g, sym=sym, aq="bf16", skip=False, shape=(R, C))


def on_grid(sp, dtype=torch.float32, seed=0, g_idx=False):
    """(fmt, w, params, g_idx): a weight exactly on the grid of `params`, in `dtype`.

    g_idx=True: GPTQ act-order groups (static_groups=False): group k holds the columns
    perm[k*g:(k+1)*g] of a random permutation, so the groups are not contiguous.
    """
    fmt = build_format(sp)
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(R, C, generator=gen) * 0.05
    w0[0, :5] = 0.0                                       # zeros and an outlier per tensor
    w0[1, 7] = 0.9
    if not g_idx:
        p = fmt.params(w0)
        return fmt, fmt.round_with(w0.to(dtype), p), p, None
    perm = torch.randperm(C, generator=gen)
    wp = w0[:, perm]                                     # groups contiguous in processing order
    p = fmt.params(wp)
    qp = fmt.round_with(wp.to(dtype), p)
    inv = torch.argsort(perm)
    return fmt, qp[:, inv], p, (inv // sp.group_size).to(torch.int32)


def same_bits(a, b):
    """Bit-identical up to the sign of zero: rounding a small negative weight gives -0.0 in the
    model, code 0 gives +0.0 back (no integer code can carry it; x * -0.0 == x * 0.0 in a sum)."""
    iv = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and torch.equal((a + 0.0).view(iv), (b + 0.0).view(iv))


INT_CASES = [(f"int{b}", g, sym) for b in range(2, 9) for g in (32, -1) for sym in (True, False)]
FLOAT_CASES = [("mxfp4", 32), ("mxfp6_e2m3", 32), ("mxfp6_e3m2", 32), ("mxfp8_e4m3", 32), ("mxfp8_e5m2", 32),
               ("mxint8", 32), ("nvfp4", 16), ("fp8_e4m3", -1), ("mxfp4", 64), ("nvfp4", 32)]


def roundtrip(sp, dtype=torch.float32, g_idx=False):
    fmt, w, p, gi = on_grid(sp, dtype, g_idx=g_idx)
    lay = layout_of(sp, act_order=gi is not None)
    t = compress(w, p, fmt, lay, gi)
    back = decompress(t, fmt, lay, dtype)
    assert back.dtype == dtype and back.shape == w.shape
    assert same_bits(back, w)
    return lay, t


# --- 1. our own round trip --------------------------------------------------------------------
@pytest.mark.parametrize("wq,g,sym", INT_CASES)
def test_int_roundtrip(wq, g, sym):
    lay, t = roundtrip(spec(wq, g, sym))
    bits = int(wq[3:])
    assert lay.format == "pack-quantized"
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (R, -(-C * bits // 32))
    assert t["weight_shape"].tolist() == [R, C]
    G = 1 if g == -1 else C // g
    assert t["weight_scale"].shape == (R, G)
    assert ("weight_zero_point" in t) == (not sym)
    if not sym:                                            # packed along the output dim
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (-(-R * bits // 32), G)


@pytest.mark.parametrize("wq,g", FLOAT_CASES)
def test_float_roundtrip(wq, g):
    roundtrip(spec(wq, g))


@pytest.mark.parametrize("wq,g,sym", [("int4", 32, True), ("int3", 32, False), ("int8", 16, False),
                                       ("mxfp4", 32, True), ("nvfp4", 16, True), ("mxfp6_e3m2", 32, True)])
def test_act_order_roundtrip(wq, g, sym):
    lay, t = roundtrip(spec(wq, g, sym), g_idx=True)
    assert lay.format == AQ_PACKED and lay.act_order
    assert t["weight_g_idx"].dtype == torch.int32 and t["weight_g_idx"].shape == (C,)


def test_trivial_g_idx_is_not_stored():
    """act_order with static groups: g_idx = column // g restates contiguous groups."""
    sp = spec("int4", 32)
    fmt, w, p, _ = on_grid(sp)
    from alphaquant.export.compressed import is_trivial_g_idx
    assert is_trivial_g_idx(torch.arange(C) // 32)
    t = compress(w, p, fmt, layout_of(sp))
    assert "weight_g_idx" not in t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wq,g,sym", [("int4", 32, True), ("int4", 32, False), ("int8", -1, True),
                                       ("mxfp4", 32, True), ("nvfp4", 16, True), ("fp8_e4m3", -1, True)])
def test_roundtrip_half_dtypes(wq, g, sym, dtype):
    roundtrip(spec(wq, g, sym), dtype)


# --- 2. int32 word packing ----------------------------------------------------------------
def ref_pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row a little-endian bit stream (element c at bits [c*bits, (c+1)*bits)), cut
    into 32-bit words, each read as a two's-complement int32; rows start on a word."""
    rows = []
    for row in u.tolist():
        nwords = -(-len(row) * bits // 32)
        words = [0] * nwords
        for c, v in enumerate(row):
            for b in range(bits):
                if (v >> b) & 1:
                    pos = c * bits + b
                    words[pos // 32] |= 1 << (pos % 32)
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 5, 31, 32, 33, 96, 100])
def test_pack_int32_reference(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    u = torch.randint(0, 2 ** bits, (3, cols), generator=g)
    u[0, :] = 2 ** bits - 1                               # all ones: the sign bit of every word
    words = pack_int32(u, bits)
    assert words.dtype == torch.int32
    assert torch.equal(words, ref_pack_int32(u, bits))
    assert torch.equal(unpack_int32(words, bits, cols), u.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_int32_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    g = torch.Generator().manual_seed(bits)
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 70), generator=g).to(torch.int8)
    off = 2 ** (bits - 1)
    ours = pack_int32(signed.to(torch.int32) + off, bits)
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(signed.t().to(torch.int32) + off, bits).t(), pack_to_int32(signed, bits, 0))
    assert torch.equal(unpack_from_int32(ours, bits, signed.shape).to(torch.int32), unpack_int32(ours, bits, 70) - off)


# --- 3. off the grid ----------------------------------------------------------------------
@pytest.mark.parametrize("wq,g,sym", [("int4", 32, True), ("int4", 32, False), ("mxfp4", 32, True),
                                       ("nvfp4", 16, True), ("fp8_e4m3", -1, True), ("mxfp6_e3m2", 32, True)])
def test_off_grid_raises(wq, g, sym):
    sp = spec(wq, g, sym)
    fmt, w, p, _ = on_grid(sp)
    w = w.clone()
    w[3, 17] = torch.nextafter(w[3, 17], torch.tensor(1.0))  # one ulp off one element
    with pytest.raises(ValueError, match="not on the grid"):
        compress(w, p, fmt, layout_of(sp))


def test_wrong_params_raise():
    sp = spec("int4", 32)
    fmt, w, p, _ = on_grid(sp)
    from alphaquant.formats.base import QParams
    with pytest.raises(ValueError, match="not on the grid"):
        compress(w, QParams(p.scale * 2, None), fmt, layout_of(sp))


# --- 4. the independent reader: compressed-tensors itself ---------------------------------
def ct_decompress(sp, t, act_order=False):
    """Decompress one module's tensors with compressed-tensors, from OUR config.json group."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig.model_validate(quantization_config({"m": sp}, ["m"] if act_order else []))
    group = qcfg.config_groups["group_0"]
    assert group.targets in (["m"], ["re:m$"]) and not qcfg.ignore
    compressor = BaseCompressor.get_value_from_registry(group.format)
    stored = dict(t)
    return compressor.decompress(stored, group)["weight"]


CT_CASES = [("int4", 128, True), ("int4", 128, False), ("int8", -1, True), ("int8", -1, False),
            ("int4", 32, False), ("int2", 32, True), ("int3", 32, False), ("int5", -1, True), ("int6", 64, False),
            ("int8", 128, True), ("mxfp4", 32, True), ("nvfp4", 16, True), ("mxfp6_e2m3", 32, True),
            ("mxfp8_e4m3", 32, True), ("fp8_e4m3", -1, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wq,g,sym", CT_CASES)
def test_compressed_tensors_reads_ours(wq, g, sym, dtype):
    sp = spec(wq, g, sym)
    fmt, w, p, _ = on_grid(sp, dtype)
    lay = layout_of(sp)
    assert lay.standard
    t = compress(w, p, fmt, lay)
    ct = ct_decompress(sp, t)
    assert ct.shape == w.shape
    if dtype == torch.float32 and wq == "nvfp4":
        # compressed-tensors dequantizes FP4 in float32 but returns bfloat16 (unpack_fp4_from_uint8's
        # default dtype): code * (fp8 / global) rounded once to bf16. Our float32 weight rounded to bf16
        # is the same number; a bf16 model (the other parametrization) is bit-identical.
        assert same_bits(ct, w.to(ct.dtype))
        return
    # Every other layout decompresses to exactly our values, returned in the dtype of the stored scale
    # (float32; bfloat16 for E8M0 MX scales, where code * 2^e is exact). Loaders cast to the model dtype
    # (transformers: `.to(dtype)`), which is the comparison that matters for a bf16 model.
    assert same_bits(ct.to(dtype), w), (ct.dtype, (ct.float() - w.float()).abs().max())


@pytest.mark.parametrize("wq,g", [("mxfp6_e3m2", 32), ("mxfp8_e5m2", 32), ("mxint8", 32), ("mxfp4", 64),
                                   ("nvfp4", 32)])
def test_nonstandard_formats_fall_back(wq, g):
    sp = spec(wq, g)
    lay = layout_of(sp)
    assert lay.format == AQ_PACKED and not lay.standard
    qcfg = quantization_config({"m": sp})
    assert qcfg["format"] == AQ_PACKED and qcfg["alphaquant"]["standard"] is False


def test_act_order_int_is_not_the_removed_ct_form():
    """compressed-tensors 0.20 refuses actorder="group" (the weight_g_idx form) and ignores g_idx.
    Int act-order modules therefore use our format name (same tensors as that old form) and no
    "actorder" key, so the standard groups of the config stay parseable by themselves."""
    from compressed_tensors.quantization import QuantizationConfig
    specs = {"a": spec("int4", 32), "b": spec("int4", 32, False), "c": spec("mxfp4", 32)}
    qcfg = quantization_config(specs, ["b"])
    groups = {g["targets"][0]: g for g in qcfg["config_groups"].values()}
    assert groups["re:b$"]["format"] == AQ_PACKED and "actorder" not in groups["re:b$"]["weights"]
    assert qcfg["format"] == "mixed-precision" and qcfg["alphaquant"]["standard"] is False
    assert qcfg["alphaquant"]["groups"][next(k for k, g in qcfg["config_groups"].items()
                                             if g["targets"] == ["re:b$"])]["act_order"] is True
    # an alphaquant-packed group makes compressed-tensors refuse the config, naming the format
    with pytest.raises(ValueError, match="alphaquant-packed"):
        QuantizationConfig.model_validate(qcfg)
    QuantizationConfig.model_validate(quantization_config(specs))        # all standard: parses


@pytest.mark.parametrize("wq,g,sym", [("int4", 128, True), ("int4", 128, False), ("int8", -1, True),
                                       ("mxfp4", 32, True), ("nvfp4", 16, True), ("mxfp6_e2m3", 32, True),
                                       ("mxfp8_e4m3", 32, True), ("fp8_e4m3", -1, True)])
def test_tensor_names_are_what_compressed_tensors_expects(wq, g, sym):
    """Exactly the parameter names the compressor declares (transformers creates those and
    reports any other stored tensor as unexpected), with compressed-tensors' own dtypes/shapes."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    sp = spec(wq, g, sym)
    fmt, w, p, _ = on_grid(sp)
    t = compress(w, p, fmt, layout_of(sp))
    group = QuantizationConfig.model_validate(quantization_config({"m": sp})).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(group.format)
    assert set(t) == set(compressor.compression_param_names(group))
    # compressed-tensors' own compress() of our dequantized weight + float scales gives our tensors
    if wq.startswith("int"):
        ref = {"weight": w, "weight_scale": p.scale}
        if not sym:
            ref["weight_zero_point"] = p.zero.to(torch.int8)
        ct = compressor.compress(ref, group)
        assert torch.equal(ct["weight_packed"], t["weight_packed"])
        assert torch.equal(ct["weight_shape"], t["weight_shape"])
        if not sym:
            assert torch.equal(ct["weight_zero_point"], t["weight_zero_point"])
