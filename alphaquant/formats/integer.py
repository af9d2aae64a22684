"""Integer formats int2 .. int8, symmetric or asymmetric, grouped along the last dim.

The arithmetic follows compressed-tensors (calculate_qparams + fake_quantize) so an
exported `pack-quantized` checkpoint decompresses to exactly our dequantized weights:

  qmin, qmax = -2^(b-1), 2^(b-1) - 1                     (signed codes, also for asym)
  symmetric:  scale = amax / ((2^b - 1) / 2)              zero = None
              code  = clamp(round(w / scale), qmin, qmax)
  asymmetric: lo, hi = min(min(w), 0), max(max(w), 0)      (0 must be representable)
              scale = (hi - lo) / (2^b - 1)
              zero  = clamp(qmin - round(lo / scale), qmin, qmax)
              code  = clamp(round(w / scale + zero), qmin, qmax)   (zero added BEFORE rounding)
  dequant:    (code - zero) * scale                         (float32)

Decisions the solver/export engineers rely on:
- All arithmetic is float32 (llm-compressor's GPTQ also works on a float32 copy).
- The scale is rounded to `scale_dtype` (default float16, like the GPTQ/compressed-tensors
  checkpoints) inside params(); that rounded value is what rounding and dequant use, so
  stored scales reproduce the dequantized weights bit for bit.
- The asymmetric zero is computed from the scale BEFORE that rounding, exactly as
  compressed-tensors does (its step 1 precedes step 3); it is stored as float32 ints.
- A scale that is 0 after rounding (all-zero group, or underflow in float16) becomes
  finfo(scale_dtype).eps, compressed-tensors' choice; the group then has codes 0
  (symmetric) or codes == zero (asymmetric, zero = qmin), dequantizing to exact 0.
- torch.round is round-half-to-even; ties therefore go to the even code. The zero point is
  added before rounding, as compressed-tensors' _quantize does (`round(x / s + z)`): with an
  odd zero point, round(w / s) + z would pick the other code at an exact tie (w / s = k + 1/2).
- w / scale is a true division (not a multiply by 1/scale), again as compressed-tensors.
  Divisions by constants go through exact_div so CPU and CUDA give identical scales
  (CUDA's tensor / python-scalar multiplies by the reciprocal; compressed-tensors run on a
  GPU can therefore differ from us by an ulp in a scale, which never affects decompression
  of what WE export, since the scale is stored).
- Default group_size is 128 for every width; pass group_size=-1 for per-channel.

    fmt = IntFormat(4, group_size=128, sym=False)
    p = fmt.params(w)            # p.scale, p.zero: [..., C // 128]
    w_hat = fmt.round_with(w, p)
"""
from __future__ import annotations

import torch

from .base import Format, QParams, QTensor, RoundingSpec, exact_div, groups_like
from .packing import pack_bits, unpack_bits


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 scales to `dtype` (saturating) and back; zeros -> eps of dtype."""
    fi = torch.finfo(dtype)
    s = scale.clamp(fi.min, fi.max).to(dtype).float()
    return torch.where(s == 0, torch.full_like(s, fi.eps), s)


class IntFormat(Format):
    def __init__(self, bits: int, group_size: int = 128, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float16, check_finite: bool = True):
        self.name = f"int{bits}"
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.scale_dtype = scale_dtype
        self.check_finite = check_finite
        self.qmin = -(2 ** (bits - 1))
        self.qmax = 2 ** (bits - 1) - 1

    def params(self, w: torch.Tensor) -> QParams:
        self.ensure_finite(w)
        wg = self.split_groups(w)                                   # [..., G, g]
        levels = 2 ** self.bits - 1
        if self.sym:
            amax = wg.abs().amax(-1)                                # [..., G]
            return QParams(round_scale(exact_div(amax, levels / 2), self.scale_dtype))
        lo = wg.amin(-1).clamp(max=0)                               # [..., G]
        hi = wg.amax(-1).clamp(min=0)
        raw = exact_div(hi - lo, levels)
        # lo == hi == 0 gives 0/0; the limit of the formula for lo = 0 is zero = qmin.
        ratio = torch.where(raw > 0, lo / raw, torch.zeros_like(raw))
        zero = torch.round(self.qmin - ratio).clamp(self.qmin, self.qmax)
        return QParams(round_scale(raw, self.scale_dtype), zero)

    def _codes(self, wg: torch.Tensor, p: QParams) -> torch.Tensor:
        x = wg / p.scale.unsqueeze(-1)                              # [..., G, g], the only full-size temporary
        if p.zero is not None:
            x.add_(p.zero.unsqueeze(-1))                            # before rounding, as compressed-tensors
        return x.round_().clamp_(self.qmin, self.qmax)

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)                     # [..., G, g]
        q = self._codes(wg, p)
        if p.zero is not None:
            q = q - p.zero.unsqueeze(-1)
        return (q * p.scale.unsqueeze(-1)).flatten(-2).to(w.dtype)

    def elementwise_rounding(self) -> RoundingSpec:
        return RoundingSpec("int", qmin=self.qmin, qmax=self.qmax)

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        wg = groups_like(w, p.scale, self.name)
        return self._codes(wg, p).flatten(-2).to(torch.int8)       # [..., C]

    def dequantize(self, q: QTensor) -> torch.Tensor:
        p = q.params
        cg = groups_like(q.codes, p.scale, self.name)               # [..., G, g]
        if p.zero is not None:
            cg = cg - p.zero.unsqueeze(-1)
        return (cg * p.scale.unsqueeze(-1)).flatten(-2)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Signed codes stored offset (code - qmin) as unsigned b-bit fields (see packing)."""
        return pack_bits(codes.to(torch.int32) - self.qmin, self.bits)

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        return (unpack_bits(data, self.bits, n) + self.qmin).to(torch.int8).reshape(shape)

    def __repr__(self) -> str:
        return (f"IntFormat({self.name}, group_size={self.group_size}, sym={self.sym}, "
                f"scale_dtype={self.scale_dtype})")

