"""fp8_e4m3: FP8-E4M3 elements with a float scale per row (or per group).

    scale = amax / 448        (rounded to scale_dtype, default float32; 0 -> eps of it)
    code  = float8_e4m3fn(clamp(w / scale, -448, 448))   raw bits as uint8
    value = code * scale

This is compressed-tensors' FP8 "channel" recipe (calculate_qparams: amax / (896 / 2),
then `tensor.clamp(...).to(float8_e4m3fn)`), so its checkpoints (`weight` stored as
float8_e4m3fn + `weight_scale`) decompress to exactly our values when the scale is
stored in float32. The torch cast rounds to nearest, ties to even; the clamp makes it
saturate instead of producing NaN.

    fmt = FP8Format()                 # group_size=-1: p.scale is [..., 1]
"""
from __future__ import annotations

import torch

from .base import Format, QParams, QTensor, RoundingSpec, exact_div, groups_like
from .floatgrid import E4M3
from .integer import round_scale

FP8_MAX = 448.0


class FP8Format(Format):
    def __init__(self, group_size: int = -1, scale_dtype: torch.dtype = torch.float32,
                 check_finite: bool = True):
        self.name = "fp8_e4m3"
        self.bits = 8
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        self.check_finite = check_finite

    def params(self, w: torch.Tensor) -> QParams:
        self.ensure_finite(w)
        amax = self.split_groups(w).abs().amax(-1)                  # [..., G]
        return QParams(round_scale(exact_div(amax, FP8_MAX), self.scale_dtype))

    def _cast(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)                     # [..., G, g]
        x = (wg / p.scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
        return x.to(torch.float8_e4m3fn)

    def elementwise_rounding(self) -> RoundingSpec:
        # the saturating cast to float8_e4m3fn is round-to-nearest-even onto the E4M3 grid
        return RoundingSpec("grid", mbits=E4M3.mbits, emin=E4M3.emin, max=FP8_MAX)

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return (self._cast(w, p).float() * p.scale.unsqueeze(-1)).flatten(-2).to(w.dtype)

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return self._cast(w, p).flatten(-2).view(torch.uint8)      # [..., C]

    def dequantize(self, q: QTensor) -> torch.Tensor:
        v = q.codes.view(torch.float8_e4m3fn).float()
        vg = groups_like(v, q.params.scale, self.name)
        return (vg * q.params.scale.unsqueeze(-1)).flatten(-2)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.reshape(-1).to(torch.uint8)

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        return data.reshape(shape).to(torch.uint8)
