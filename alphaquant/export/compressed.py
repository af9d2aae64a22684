"""One quantized linear <-> its checkpoint tensors (compressed-tensors names), and back.

    lay = layout_of(spec)                          # Layout("pack-quantized", {"num_bits": 4, ...})
    t = compress(w, params, fmt, lay)              # {"weight_packed", "weight_scale", "weight_shape"}
    w2 = decompress(t, fmt, lay, dtype=w.dtype)    # torch.equal(w2, w)

`w` is the DEQUANTIZED weight [out, in] as the model holds it (model dtype) and `params` the
QParams it was rounded with; the codes are recovered with fmt.encode and checked to
dequantize back to `w` exactly, so a checkpoint can never hold something other than the
weights we evaluated. The layouts, per format, are in README.md beside this file. Keys are
local ("weight_scale"); the writer prefixes the module name. Pure tensor code: no model,
no files, no compressed-tensors import (that package is only the independent reader in tests).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alphaquant.formats import ALIASES
from alphaquant.formats.base import QParams, QTensor
from alphaquant.formats.mx import MXFormat
from alphaquant.formats.packing import pack_bits, unpack_bits

AQ_PACKED = "alphaquant-packed"        # our own layout, for what compressed-tensors cannot express

# compressed-tensors stores packed int words as native int32; both sides assume little-endian.
assert sys.byteorder == "little", "alphaquant.export writes little-endian int32 words"


@dataclass(frozen=True)
class Layout:
    """How one QuantSpec is stored: a compressed-tensors format + its QuantizationArgs (dict)."""

    format: str                                    # "pack-quantized", ..., or AQ_PACKED
    weights: dict = field(default_factory=dict)    # the config group's "weights" entry
    act_order: bool = False                        # weight_g_idx stored (GPTQ act-order groups)

    @property
    def standard(self) -> bool:
        return self.format != AQ_PACKED

    def key(self) -> tuple:
        return (self.format, tuple(sorted((k, str(v)) for k, v in self.weights.items())), self.act_order)


def _args(num_bits, type_, group_size, *, symmetric=True, strategy=None, scale_dtype=None):
    """A QuantizationArgs dict as compressed-tensors serialises it (None fields omitted)."""
    strategy = strategy or ("channel" if group_size == -1 else "group")
    d = {"num_bits": num_bits, "type": type_, "symmetric": symmetric,
         "group_size": None if strategy == "channel" else group_size, "strategy": strategy, "dynamic": False}
    if scale_dtype:
        d["scale_dtype"] = scale_dtype
    if not symmetric:
        d["zp_dtype"] = "torch.int8"
    return d


def layout_of(spec, act_order: bool = False) -> Layout:
    """The layout of a quantized QuantSpec (spec.quantized must be True).

    act_order: the module's columns were grouped by a non-trivial g_idx (GPTQ act_order
    without static groups); stored as weight_g_idx, the pre-0.20 compressed-tensors form.
    """
    wq, g = ALIASES.get(spec.wq, spec.wq), spec.group_size          # "mxfp6" is mxfp6_e2m3, "mxfp8" mxfp8_e4m3
    if wq.startswith("int"):
        args = _args(int(wq[3:]), "int", g, symmetric=spec.sym)
        if act_order:
            # compressed-tensors < 0.20 wrote this as pack-quantized + actorder "group" + weight_g_idx;
            # 0.20 removed it (QuantizationArgs refuses actorder="group", so one such group would make
            # the whole config.json unreadable) and ignores g_idx. We keep exactly those tensors
            # (int32 words, packed zero points, weight_g_idx) under our own format name.
            return Layout(AQ_PACKED, args, True)
        # pack-quantized covers 1..8 bits, group or channel, sym or asym (weight_zero_point)
        return Layout("pack-quantized", args)
    if act_order:
        # g_idx exists only for integer layouts; ours keeps it for every format
        return Layout(AQ_PACKED, _aq_args(spec), True)
    if wq == "nvfp4" and g == 16:
        return Layout("nvfp4-pack-quantized", _args(4, "float", 16, strategy="tensor_group",
                                                    scale_dtype="torch.float8_e4m3fn"))
    if wq == "mxfp4" and g == 32:
        return Layout("mxfp4-pack-quantized", _args(4, "float", 32, scale_dtype="torch.uint8"))
    if wq == "mxfp6_e2m3" and g == 32:
        return Layout("mxfp6-pack-quantized", _args(6, "float", 32, scale_dtype="torch.uint8"))
    if wq == "mxfp8_e4m3" and g == 32:
        return Layout("mxfp8-quantized", _args(8, "float", 32, scale_dtype="torch.uint8"))
    if wq == "fp8_e4m3" and g == -1:
        return Layout("float-quantized", _args(8, "float", -1))
    return Layout(AQ_PACKED, _aq_args(spec))


def _aq_args(spec) -> dict:
    """The closest QuantizationArgs for an AlphaQuant-only format (informative: num_bits, type, group)."""
    bits = {"mxfp4": 4, "nvfp4": 4, "mxfp6": 6, "mxfp6_e2m3": 6, "mxfp6_e3m2": 6}.get(spec.wq, 8)
    type_ = "int" if spec.wq.startswith("int") or spec.wq == "mxint8" else "float"
    return _args(bits, type_, spec.group_size, symmetric=spec.sym or not spec.wq.startswith("int"))


# --- int32 word packing (compressed-tensors' pack_to_int32 layout) ---------------------------
def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 [R, ceil(C*bits/32)]: per row a little-endian bit stream,
    element c at bits [c*bits, (c+1)*bits); rows start on a word boundary."""
    R, C = u.shape
    C32 = -(-C // 32) * 32                                              # 32 codes fill `bits` words
    u = F.pad(u.to(torch.int32), (0, C32 - C))
    words = pack_bits(u, bits).view(torch.int32).reshape(R, C32 * bits // 32)
    return words[:, : math.ceil(C * bits / 32)].contiguous()


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 [R, W] -> unsigned int32 codes [R, cols]."""
    R, W = words.shape
    C32 = -(-cols // 32) * 32
    words = F.pad(words.to(torch.int32), (0, C32 * bits // 32 - W)).contiguous()
    return unpack_bits(words.view(torch.uint8).reshape(-1), bits, R * C32).reshape(R, C32)[:, :cols]


# --- encode / decode ------------------------------------------------------------------------
def _group_perm(g_idx: torch.Tensor | None) -> torch.Tensor | None:
    """Column order that makes g_idx groups contiguous (None when they already are)."""
    if g_idx is None:
        return None
    g_idx = g_idx.reshape(-1).long()
    if bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None
    return torch.argsort(g_idx, stable=True)


def is_trivial_g_idx(g_idx: torch.Tensor | None) -> bool:
    """g_idx that only restates contiguous groups (static groups): nothing to store."""
    return _group_perm(g_idx) is None


def encode_codes(w: torch.Tensor, params: QParams, fmt, g_idx=None) -> torch.Tensor:
    """Codes [R, C] of the dequantized weight w, checked to reproduce w exactly."""
    perm = _group_perm(g_idx)
    wp = w.float() if perm is None else w.float()[:, perm]
    codes = fmt.encode(wp, params)
    back = fmt.dequantize(QTensor(codes, params, tuple(wp.shape), fmt.name)).to(w.dtype)
    if not torch.equal(back, wp.to(w.dtype)):
        bad = (back != wp.to(w.dtype)).sum().item()
        raise ValueError(f"{fmt.name}: {bad} weight(s) are not on the grid of their params; export needs "
                         f"the dequantized weight and the params it was rounded with")
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _scale_store(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales in the model dtype when that is lossless, else float32.

    compressed-tensors dequantizes in the scale's dtype; a scale in the model dtype (or
    float32) makes its (q - z) * s round exactly like ours, so decompression is bit-exact.
    For a stack of linears (compress_stack) the choice is made for the stack as a whole.
    """
    s = scale.float()
    if dtype != torch.float32 and torch.equal(s.to(dtype).float(), s):
        return s.to(dtype)
    return s


def compress(w: torch.Tensor, params: QParams, fmt, layout: Layout, g_idx=None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (local names) of one linear; w: dequantized weight [R, C]."""
    out = _compress(w, params, fmt, layout, g_idx)
    # own storage for every tensor: params of modules solved together are views of one tensor
    # (gate/up share a g_idx, stacked experts' NVFP4 global scales), which safetensors refuses
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def can_stack(fmt, layout: Layout, shape: tuple) -> bool:
    """Whether `compress_stack` applies: no act-order g_idx, and packed bytes that end on a
    linear's last code (so one stream for the stack splits into each linear's bytes)."""
    R, C = shape
    return not layout.act_order and (R * C * fmt.bits) % 8 == 0 and (fmt.bits != 6 or (R * C) % 4 == 0)


def compress_stack(w: torch.Tensor, params: QParams, fmt, layout: Layout) -> dict[str, torch.Tensor]:
    """`compress` for N linears of one spec and shape at once: w [N, R, C], params stacked [N, ...].

    Returns {local name: [N, ...]}: entry n is exactly what compress() gives linear n (row n of
    every tensor), except that a stack stores its scales in the model dtype only when that is
    lossless for all N. A decoder layer's 64-128 experts thus cost one set of kernels and host
    syncs instead of one per expert. Rows are views of the stacked tensors (see writer.to_host)."""
    if not can_stack(fmt, layout, tuple(w.shape[1:])):
        raise ValueError(f"{layout.format}: these linears cannot be compressed as one stack")
    return _compress(w, params, fmt, layout, None)


def _compress(w: torch.Tensor, params: QParams, fmt, layout: Layout, g_idx) -> dict[str, torch.Tensor]:
    """compress for w [..., R, C] (leading dims: a stack of linears); tensors may be views."""
    *lead, R, C = w.shape
    codes = encode_codes(w, params, fmt, g_idx)
    shape = torch.tensor([R, C], dtype=torch.int64).repeat(*lead, 1)
    out: dict[str, torch.Tensor] = {}
    f = layout.format
    if _int32_words(fmt, layout):
        off = 2 ** (fmt.bits - 1)                                     # signed -> unsigned, as CT
        out["weight_packed"] = pack_int32((codes.to(torch.int32) + off).reshape(-1, C), fmt.bits).reshape(*lead, R, -1)
        out["weight_scale"] = _scale_store(params.scale, w.dtype)
        if params.zero is not None:                                   # packed along the out dim
            z = (params.zero.to(torch.int32) + off).transpose(-1, -2)  # [..., G, R]
            G = z.shape[-2]
            out["weight_zero_point"] = pack_int32(z.reshape(-1, R), fmt.bits).reshape(*lead, G, -1).transpose(-1, -2).contiguous()
        out["weight_shape"] = shape
    elif f in ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized"):
        out["weight_packed"] = fmt.pack(codes).reshape(*lead, R, -1)  # fp4: 2/byte, fp6: 4 per 3 bytes
        if f == "nvfp4-pack-quantized":
            out["weight_scale"] = params.extra["block_scale_fp8"]
            out["weight_global_scale"] = params.extra["weight_global_scale"].float().reshape(*lead, 1)
        else:
            out["weight_scale"] = params.extra["scale_e8m0"]
        # no weight_shape: compressed-tensors' FP4/FP6 compressors neither write nor expect one
        # (transformers would report it as an unexpected key); the width follows from the bytes
    elif f in ("mxfp8-quantized", "float-quantized"):
        out["weight"] = codes.to(torch.uint8).view(torch.float8_e4m3fn)
        out["weight_scale"] = params.extra["scale_e8m0"] if f == "mxfp8-quantized" else params.scale.float()
    else:                                                             # AQ_PACKED
        out.update(_aq_params(params, fmt, lead))
        out["weight_packed"] = fmt.pack(codes).reshape(*lead, -1)
        out["weight_shape"] = shape
    if layout.act_order:
        out["weight_g_idx"] = g_idx.reshape(-1).to(torch.int32)
    return out


def _int32_words(fmt, layout: Layout) -> bool:
    """Integer codes stored as pack-quantized int32 words: pack-quantized itself and int act-order."""
    return layout.format == "pack-quantized" or (layout.format == AQ_PACKED and fmt.name.startswith("int"))


def _aq_params(params: QParams, fmt, lead=()) -> dict[str, torch.Tensor]:
    """Stored params of the AlphaQuant layout: each format's own exact stored form."""
    if "scale_e8m0" in params.extra:
        return {"weight_scale": params.extra["scale_e8m0"]}
    if "block_scale_fp8" in params.extra:
        return {"weight_scale": params.extra["block_scale_fp8"],
                "weight_global_scale": params.extra["weight_global_scale"].float().reshape(*lead, 1)}
    out = {"weight_scale": params.scale.to(getattr(fmt, "scale_dtype", torch.float32))}
    if params.zero is not None:
        out["weight_zero_point"] = params.zero.to(torch.int8)
    return out


def _params_from(t: dict, fmt, layout: Layout) -> QParams:
    """QParams from stored tensors (the inverse of what compress stored)."""
    scale = t["weight_scale"]
    if scale.dtype == torch.uint8:                                    # E8M0 exponents (MX)
        return MXFormat.params_from_e8m0(scale)
    if scale.dtype == torch.float8_e4m3fn:                            # NVFP4 block scales
        wgs = t["weight_global_scale"].float().reshape(())
        return QParams(scale.float() / wgs, None, {"block_scale_fp8": scale, "weight_global_scale": wgs})
    zero = t.get("weight_zero_point")
    if zero is not None and _int32_words(fmt, layout):
        off = 2 ** (fmt.bits - 1)
        zero = unpack_int32(zero.t().contiguous(), fmt.bits, scale.shape[0]).t() - off
    return QParams(scale.float(), None if zero is None else zero.float())


def decompress(t: dict[str, torch.Tensor], fmt, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight [R, C] in `dtype` from one linear's stored tensors."""
    p = _params_from(t, fmt, layout)
    f = layout.format
    if "weight_shape" in t:
        R, C = (int(x) for x in t["weight_shape"].tolist())
    elif "weight" in t:
        R, C = t["weight"].shape
    else:                                                             # fp4: 2 codes per byte, fp6: 4 per 3
        R, C = t["weight_packed"].shape[0], t["weight_packed"].shape[1] * 8 // fmt.bits
    if _int32_words(fmt, layout):
        codes = unpack_int32(t["weight_packed"], fmt.bits, C) - 2 ** (fmt.bits - 1)
    elif "weight" in t:
        codes = t["weight"].view(torch.uint8)
    else:
        codes = fmt.unpack(t["weight_packed"].reshape(-1), (R, C))
    perm = _group_perm(t.get("weight_g_idx"))
    if perm is not None:
        codes = codes[:, perm]                                        # groups contiguous again
    w = fmt.dequantize(QTensor(codes, p, (R, C), fmt.name))
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w.to(dtype)
