"""NVFP4: E2M1 elements, an FP8-E4M3 scale per block of 16, an FP32 scale per matrix.

The per-matrix ("global") scale is taken over the LAST TWO dims, so a stack [E, R, C]
gets one per expert and a single weight [R, C] one in total (a 1-D tensor: over it all).

Spec form (REFERENCES.md):  global = amax / (6 * 448)
                            block  = fp8_e4m3(amax_block / (6 * global))
                            effective scale = block * global
We compute the same quantities in compressed-tensors' arithmetic, because its
checkpoints store the RECIPROCAL of the global scale and decompress with a division:

  weight_global_scale = (1 / amax) * 2688          (CT: generate_gparam's `448 * 6 / amax`,
                                                     which torch evaluates as reciprocal times
                                                     2688; amax clamped to float32 tiny, NaN/Inf
                                                     -> 1.0)
  block_scale_fp8     = fp8_e4m3(clamp((amax_block / 6) * weight_global_scale, <= 448))
                        (0 -> 0.125, the fp8 eps, as CT does for empty blocks)
  effective scale     = block_scale_fp8.float() / weight_global_scale
  element code        = E2M1(w / effective scale)   (ties to even, saturating at +-6)

For the export engineer: write extra["block_scale_fp8"] as `weight_scale` and
extra["weight_global_scale"] (float32, one per matrix) as `weight_global_scale`;
compressed-tensors then reproduces our dequantized weights bit for bit
(codes * (weight_scale / weight_global_scale)). extra["global_scale"] = 1 / that is the
spec's multiplier, kept for reading convenience only; it equals amax / 2688 up to float32
rounding. Code nibbles are E2M1 bit patterns, packed two per byte, low nibble first
(the order CT's pack_fp4_to_uint8 uses).

    fmt = NVFP4Format()
    p = fmt.params(w)       # w: [E, R, C]; p.scale: [E, R, C // 16]; global: [E]
"""
from __future__ import annotations

import torch

from .base import Format, QParams, QTensor, RoundingSpec, exact_div, exact_rdiv, groups_like
from .floatgrid import E2M1, E4M3, bits_to_elem, elem_to_bits, round_to_elem
from .packing import pack_bits, unpack_bits

FP8_MAX = E4M3.max
FP8_EPS = 0.125


class NVFP4Format(Format):
    def __init__(self, group_size: int = 16, check_finite: bool = True):
        self.name = "nvfp4"
        self.bits = 4
        self.group_size = group_size
        self.check_finite = check_finite

    def params(self, w: torch.Tensor) -> QParams:
        self.ensure_finite(w)
        wg = self.split_groups(w)                                   # [..., R, G, g]
        mat_dims = (-2, -1) if w.dim() >= 2 else (-1,)
        amax = w.float().abs().amax(dim=mat_dims)                   # [...] one per matrix
        amax = amax.clamp(min=torch.finfo(torch.float32).tiny)
        # compressed-tensors' generate_gparam writes `448 * 6 / amax`, which PyTorch evaluates as
        # amax.reciprocal() * 2688 (Tensor.__rtruediv__): 1 ulp from the true quotient for ~25% of
        # amax values. We take its arithmetic, so a reader that recomputes the scale gets ours.
        wgs = torch.nan_to_num(amax.reciprocal() * (E2M1.max * FP8_MAX), nan=1.0, posinf=1.0, neginf=1.0)
        wgs_b = wgs.reshape(wgs.shape + (1,) * (len(mat_dims)))     # broadcast over [R, G]
        block = exact_div(wg.abs().amax(-1), E2M1.max) * wgs_b              # [..., R, G]
        block_fp8 = block.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        block_f = block_fp8.float()
        block_f = torch.where(block_f == 0, torch.full_like(block_f, FP8_EPS), block_f)
        block_fp8 = block_f.to(torch.float8_e4m3fn)
        return QParams(block_f / wgs_b, None,
                       {"block_scale_fp8": block_fp8, "weight_global_scale": wgs,
                        "global_scale": exact_rdiv(1.0, wgs)})

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)                     # [..., G, g]
        s = p.scale.unsqueeze(-1)
        return (round_to_elem(wg / s, E2M1) * s).flatten(-2).to(w.dtype)

    def elementwise_rounding(self) -> RoundingSpec:
        return RoundingSpec("grid", mbits=E2M1.mbits, emin=E2M1.emin, max=E2M1.max)

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)
        return elem_to_bits(round_to_elem(wg / p.scale.unsqueeze(-1), E2M1), E2M1).flatten(-2)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        vg = groups_like(bits_to_elem(q.codes, E2M1), q.params.scale, self.name)
        return (vg * q.params.scale.unsqueeze(-1)).flatten(-2)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_bits(codes, 4)

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        return unpack_bits(data, 4, int(torch.Size(shape).numel())).to(torch.uint8).reshape(shape)
