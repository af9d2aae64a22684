"""Two of the decoder layer's memory-bound op chains as one Triton kernel each (CUDA; Triton optional).

In eager torch each of these is a chain of full-tensor passes with temporaries; on an H200 they were ~65 ms of an
OLMoE-1B-7B layer's ~560 ms of GPU time at 128 x 2048 calibration tokens (bench/trace_report.py's "GPU kernel time
by range": RMSNorm.forward 47 ms, the routed experts' weighting and combine 31 ms).

* `rms_norm(x, weight, eps)`: RMSNorm.forward -- x in float32, x * rsqrt(mean(x^2) + eps), rounded to x's dtype,
  times the weight, rounded again -- one read of x and one write of the output instead of ~20 bytes of traffic per
  element. The same operations in the same order, except the sum of squares, which is a tree over the row in
  another order than torch's reduction: the mean can differ in its last float32 bit, which moves an output by one
  unit in the last place where the product lies next to a rounding boundary (tests/test_model_kernels.py bounds
  it: every element within one ulp, nearly all equal).
* `weighted_combine(y, weights, rows_by_token)`: the routed experts' ``y * w`` (rounded to y's dtype) summed per
  token over its experts in increasing expert order, one rounding per addition -- `ExpertRoute.combine` of
  ``y.mul_(w[:, None])``, bit for bit (no fused multiply-add: every product and sum is rounded as torch rounds it),
  with one read of y and no [T*k, H] temporary.

`enabled(x)` says where they run: CUDA tensors of bfloat16 / float16 with Triton present and `FUSED` on (the CPU,
and autograd, keep the eager ops). Under Triton's interpreter (TRITON_INTERPRET=1) the functions also take CPU
tensors, which is how the tests check them without a GPU; the model code still dispatches only on CUDA.
"""
from __future__ import annotations

import os

import torch

try:                                    # optional: a CUDA build of torch brings it
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU-only installs
    triton = None

FUSED = True
"""Whether the model code takes these kernels where they run (False: always the eager ops)."""
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HALF = (torch.bfloat16, torch.float16)
MAX_ROW = 65536
"""Longest row rms_norm holds in one program."""


def enabled(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """The model's dispatch: a CUDA half-precision tensor, Triton, and no autograd graph wanted through x or the
    op's parameters (the kernels have no backward)."""
    return (FUSED and triton is not None and x.is_cuda and x.dtype in HALF
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))))


def _runs_on(x: torch.Tensor) -> bool:
    return triton is not None and x.device.type == ("cpu" if INTERPRETED else "cuda") and x.dtype in HALF


if triton is not None:
    from alphaquant.gptq.weighted_split import _to_half      # RNE float32 -> half, also under the interpreter

    @triton.jit
    def _rms_norm_kernel(X, Wt, Out, cols, inv_n, eps, BLOCK: tl.constexpr, BF16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < cols
        x = tl.load(X + row * cols + offs, mask=m, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) * inv_n                   # torch's mean: the sum times 1/n
        y = _to_half(x * tl.rsqrt(var + eps), Out, BF16)      # xf * rsqrt(...), then .to(dtype)
        w = tl.load(Wt + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * cols + offs, _to_half(w * y.to(tl.float32), Out, BF16), mask=m)

    @triton.jit
    def _combine_kernel(Y, Wr, Rows, Out, cols, K: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < cols
        r = tl.load(Rows + t * K)
        acc = _to_half(tl.load(Y + r * cols + offs, mask=m, other=0.0).to(tl.float32)
                       * tl.load(Wr + r).to(tl.float32), Out, BF16)
        for s in tl.static_range(1, K):
            r = tl.load(Rows + t * K + s)
            c = _to_half(tl.load(Y + r * cols + offs, mask=m, other=0.0).to(tl.float32)
                         * tl.load(Wr + r).to(tl.float32), Out, BF16)
            acc = _to_half(acc.to(tl.float32) + c.to(tl.float32), Out, BF16)
        tl.store(Out + t * cols + offs, acc, mask=m)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference (RMSNorm.forward): normalise in float32, cast back before the weight (bf16 parity)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; the kernel where it runs (weight of x's dtype, row <= MAX_ROW), else eager."""
    cols = x.shape[-1]
    if not (_runs_on(x) and weight.dtype == x.dtype and weight.shape == (cols,) and 0 < cols <= MAX_ROW
            and x.numel() > 0):
        return rms_norm_eager(x, weight, eps)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    BLOCK = triton.next_power_of_2(cols)
    _rms_norm_kernel[(xc.numel() // cols,)](xc, weight.contiguous(), out, cols, 1.0 / cols, float(eps), BLOCK=BLOCK,
                                           BF16=x.dtype == torch.bfloat16, num_warps=max(1, min(16, BLOCK // 256)),
                                           enable_fp_fusion=False)
    return out


def combine_rows(contrib: torch.Tensor, rows_by_token: torch.Tensor) -> torch.Tensor:
    """contrib [T*k, H] -> [T, H]: per token, its k rows added in order (ExpertRoute.combine)."""
    out = contrib.index_select(0, rows_by_token[:, 0])
    for r in range(1, rows_by_token.shape[1]):
        out.add_(contrib.index_select(0, rows_by_token[:, r]))
    return out


def weighted_combine_eager(y: torch.Tensor, weights: torch.Tensor, rows_by_token: torch.Tensor) -> torch.Tensor:
    """The reference: y * w in place (computed in the promoted dtype, rounded once to y's), then `combine_rows`."""
    return combine_rows(y.mul_(weights[:, None]), rows_by_token)


def weighted_combine(y: torch.Tensor, weights: torch.Tensor, rows_by_token: torch.Tensor) -> torch.Tensor:
    """y [T*k, H] (sorted rows), weights [T*k], rows_by_token [T, k] -> [T, H]; y is left unchanged by the kernel
    and scaled in place by the eager path (callers drop it)."""
    if not (_runs_on(y) and y.dim() == 2 and y.shape[0] > 0 and y.shape[1] > 0 and rows_by_token.shape[0] > 0):
        return weighted_combine_eager(y, weights, rows_by_token)
    yc, rows = y.contiguous(), rows_by_token.to(torch.int64).contiguous()
    T, K = rows.shape
    cols = yc.shape[1]
    out = torch.empty(T, cols, dtype=y.dtype, device=y.device)
    BLOCK = min(1024, triton.next_power_of_2(cols))
    _combine_kernel[(T, triton.cdiv(cols, BLOCK))](yc, weights.contiguous(), rows, out, cols, K=K, BLOCK=BLOCK,
                                                 BF16=y.dtype == torch.bfloat16, num_warps=4,
                                                 enable_fp_fusion=False)
    return out
