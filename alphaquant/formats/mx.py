"""OCP Microscaling (MX v1.0) formats: mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxfp8_e5m2, mxint8.

A block of `group_size` consecutive elements (32 in the spec; other sizes accepted)
shares one E8M0 scale X = 2^s, stored as the uint8 code s + 127 (0xFF = NaN):

  scale_mode="floor" (spec): s = floor(log2(amax)) - emax_elem
  scale_mode="ceil":         the smallest s with amax / 2^s <= max_elem (never clips)
  s is clamped to the E8M0 range [-127, 127]; amax == 0 gives s = -127 (code 0); a block holding
  a NaN or Inf (only possible with check_finite=False) gets code 0xFF: the whole block is NaN.
  elements = round(v / X) to the element grid, ties to even, saturating at +-max.

emax_elem / max: E2M1 2 / 6, E2M3 2 / 7.5, E3M2 4 / 28, E4M3 8 / 448, E5M2 15 / 57344,
MXINT8 0 / 127/64. With "floor" the block max can land above the element max (e.g. up to
7.99 for E2M1) and saturates; "ceil" avoids that clipping at the cost of one binade of
resolution for blocks whose max would not have clipped.

Codes: FP elements are raw bit patterns (sign|exp|mantissa) in uint8; MXINT8 codes are
int8 k (the value is k/64), packed as two's complement bytes as the OCP spec stores them.
QParams: scale = 2^s float32 [..., G]; extra["scale_e8m0"] = uint8 codes [..., G].
Dequantization goes through p.scale; params_from_e8m0() rebuilds params from stored
codes, mapping 0xFF to a NaN scale (so the block dequantizes to NaN).

    fmt = MXFormat("mxfp4", "e2m1")
    p = fmt.params(w)                  # p.extra["scale_e8m0"]: uint8 [..., C // 32]
"""
from __future__ import annotations

import torch

from .base import Format, QParams, QTensor, RoundingSpec, groups_like
from .floatgrid import ELEM_FORMATS, bits_to_elem, elem_to_bits, floor_log2, pow2, round_to_elem
from .packing import pack_bits, unpack_bits

E8M0_BIAS = 127
E8M0_NAN = 0xFF
MXINT8_MAX = 127 / 64


class MXFormat(Format):
    def __init__(self, name: str, elem: str, group_size: int = 32, scale_mode: str = "floor",
                 check_finite: bool = True):
        self.name = name
        self.elem = None if elem == "int8" else ELEM_FORMATS[elem]  # None = MXINT8
        self.bits = 8 if self.elem is None else self.elem.bits
        self.emax = 0 if self.elem is None else self.elem.emax
        self.max = MXINT8_MAX if self.elem is None else self.elem.max
        self.group_size = group_size
        self.scale_mode = scale_mode
        self.check_finite = check_finite

    # --- scales ----------------------------------------------------------------------
    def shared_exponent(self, amax: torch.Tensor) -> torch.Tensor:
        """int32 s per block from float32 amax >= 0 (see module docstring)."""
        s = floor_log2(amax) - self.emax                            # exact, no log2 rounding
        if self.scale_mode == "ceil":
            # amax / 2^s lies in [2^emax, 2^(emax+1)); one binade up if it exceeds max.
            s = s + (amax * pow2((-s).clamp(max=127)) > self.max).to(torch.int32)
        return s.clamp(-E8M0_BIAS, E8M0_BIAS)

    def params(self, w: torch.Tensor) -> QParams:
        self.ensure_finite(w)
        amax = self.split_groups(w).abs().amax(-1)                  # [..., G]
        codes = (self.shared_exponent(amax) + E8M0_BIAS).to(torch.uint8)
        # a NaN (or Inf) in a block makes its scale NaN (0xFF) and so the whole block NaN, as the OCP
        # spec, microxcaling and torchao do; reached only with check_finite=False (activations)
        codes = torch.where(torch.isfinite(amax), codes, torch.full_like(codes, E8M0_NAN))
        return self.params_from_e8m0(codes)

    @staticmethod
    def params_from_e8m0(codes: torch.Tensor) -> QParams:
        """Stored E8M0 codes [..., G] -> params; 0xFF gives a NaN scale."""
        c = codes.to(torch.int32)
        scale = torch.where(c == E8M0_NAN, float("nan"), pow2(c - E8M0_BIAS))
        return QParams(scale, None, {"scale_e8m0": codes.to(torch.uint8)})

    # --- elements --------------------------------------------------------------------
    def _round(self, x: torch.Tensor) -> torch.Tensor:
        if self.elem is None:
            return torch.round(x * 64).clamp(-127, 127) / 64
        return round_to_elem(x, self.elem)

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)                     # [..., G, g]
        s = p.scale.unsqueeze(-1)
        return (self._round(wg / s) * s).flatten(-2).to(w.dtype)

    def elementwise_rounding(self) -> RoundingSpec:
        if self.elem is None:
            return RoundingSpec("int64ths")
        return RoundingSpec("grid", mbits=self.elem.mbits, emin=self.elem.emin, max=self.elem.max)

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)
        q = self._round(wg / p.scale.unsqueeze(-1)).flatten(-2)     # [..., C] grid values
        if self.elem is None:
            return (q * 64).to(torch.int8)
        return elem_to_bits(q, self.elem)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        v = q.codes.float() / 64 if self.elem is None else bits_to_elem(q.codes, self.elem)
        vg = groups_like(v, q.params.scale, self.name)
        return (vg * q.params.scale.unsqueeze(-1)).flatten(-2)

    # --- storage -----------------------------------------------------------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """FP codes as b-bit fields (fp4: low nibble first; fp6: 4 per 3 bytes); int8 as bytes."""
        if self.elem is None:
            return codes.reshape(-1).to(torch.int8).view(torch.uint8)
        return pack_bits(codes, self.bits)

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        if self.elem is None:
            return data.reshape(-1).to(torch.uint8).view(torch.int8).reshape(shape)
        n = int(torch.Size(shape).numel())
        return unpack_bits(data, self.bits, n).to(torch.uint8).reshape(shape)

    def __repr__(self) -> str:
        return f"MXFormat({self.name}, group_size={self.group_size}, scale_mode={self.scale_mode!r})"
