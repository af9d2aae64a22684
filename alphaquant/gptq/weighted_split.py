"""c·x = hi + lo in half precision, in one pass: the routed experts' weighted Hessian operand (gptq/hessian.py).

`accumulate_hessian_fast` computes Σ c x xᵀ as two half-precision matmuls with float32 output, hiᵀx + loᵀx, where
hi = half(c·x) and lo = half(c·x − hi) (c·x in float32). In torch that is a float32 temporary and three casts
with mixed dtypes, which run TensorIterator's dynamic-casting kernels: about 28 bytes of memory traffic per
element and, on an H200, ~60 ms of each MoE layer's gate/up collect pass. Here ONE Triton kernel reads x and c
once and writes hi and lo (6 bytes per element), with the same float32 product (no fused multiply-add:
it would skip that rounding) and round-to-nearest-even casts, so hi and lo are those values bit for bit.

Triton is optional (`available()`): CPU tensors, and installs without Triton, take the torch expression.
"""
from __future__ import annotations

import torch

from alphaquant.gptq.fused_sweep import INTERPRETED

try:                                    # optional: a CUDA build of torch brings it
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU-only installs
    triton = None

BLOCK = 2048


def available(x: torch.Tensor) -> bool:
    kind = "cpu" if INTERPRETED else "cuda"
    return triton is not None and x.device.type == kind and x.dtype in (torch.bfloat16, torch.float16)


def split_torch(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: x [T, C] half, c [T] -> (half(c·x), half(c·x − hi)), c·x in float32."""
    v = x.float() * c.reshape(-1, 1).float()
    hi = v.to(x.dtype)
    return hi, (v - hi.float()).to(x.dtype)


if triton is not None:
    @triton.jit
    def _to_half(v, out_ptr, BF16: tl.constexpr):
        """float32 -> the output's half type, round to nearest even. bfloat16 by integer arithmetic on the bits
        (the upper 16 bits after adding 0x7FFF plus the kept bits' lowest one): the same as the hardware cast,
        and also under Triton's interpreter, whose numpy bfloat16 cast truncates."""
        if BF16:
            b = v.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            return b.to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _split_kernel(x_ptr, c_ptr, hi_ptr, lo_ptr, n, cols, BLOCK: tl.constexpr, BF16: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs // cols, mask=mask, other=0.0)
        v = x * c
        hi = _to_half(v, hi_ptr, BF16)
        lo = _to_half(v - hi.to(tl.float32), lo_ptr, BF16)
        tl.store(hi_ptr + offs, hi, mask=mask)
        tl.store(lo_ptr + offs, lo, mask=mask)


def split_weighted(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of c·x for x [T, C] (bf16/fp16) and c [T] (any float dtype): the Triton kernel where it runs,
    else `split_torch`; the same values either way."""
    if not available(x) or x.numel() == 0:
        return split_torch(x, c)
    x = x.contiguous()
    c = c.reshape(-1).float().contiguous()
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    _split_kernel[(triton.cdiv(n, BLOCK),)](x, c, hi, lo, n, x.shape[-1], BLOCK=BLOCK,
                                             BF16=x.dtype == torch.bfloat16, num_warps=8,
                                             enable_fp_fusion=False)   # c·x rounded to fp32 before - hi, as torch
    return hi, lo
