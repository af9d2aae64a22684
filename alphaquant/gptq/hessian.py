"""Streaming Hessian accumulation for GPTQ: H = 2/N Σ_t c_t x_t x_tᵀ.

GPTQ needs, per linear layer, the Hessian of the layer-wise squared error
||W X - Q X||² with respect to a row of W, which is H = 2 X Xᵀ / N over the N calibration
tokens. For MoE experts each token may carry a weight c_t (its routing probability, as in
MoEQuant's AGQ): H = 2/N Σ_t c_t x_t x_tᵀ, the same as feeding √c_t · x_t.

We keep RAW sums (Σ c x xᵀ, the token count and Σ c) and normalise only in `finalize`.
Raw sums add: summing `H`, `n_tokens` and `weight_sum` of several states (batches, or
DDP ranks via all_reduce(SUM)) and then finalising gives exactly what one process seeing
every token would give. A running mean (as in the GPTQ reference code) would not.

Normalisation uses the TOKEN COUNT N (tokens with c_t > 0), as in GPTQ, not Σ c_t. The
GPTQ solution is invariant to any positive scale of H (damping is relative to mean(diag H)),
so this choice only fixes the scale of the reported proxy loss; `weight_sum` is kept so a
caller can renormalise to a weighted mean (H · N / Σc) if it prefers.

    state = HessianState.zeros(cols=2048, experts=64)
    for x, probs in batches:             # x [T, 2048], probs [64, T] (0 = not routed)
        state.add(x, weight=probs)
    H = state.finalize()                 # [64, 2048, 2048] fp32
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from alphaquant.gptq.weighted_split import split_weighted


def _weighted_tokens(x: torch.Tensor, weight: torch.Tensor | None, experts: int | None):
    """Flatten x to tokens and pair it with per-token weights.

    Returns (x [T, C] or [E, T, C] fp32, weight None or [T] / [E, T] fp32).
    With experts=None (a 2D Hessian) every leading dim of x is a token dim.
    With experts=E, x is [E, T, C] (per-expert tokens) or [T, C] (shared by all experts,
    then weight is usually [E, T] routing probabilities).
    """
    x = x.float()
    if experts is None:
        x = x.reshape(-1, x.shape[-1])                              # [T, C]
        if weight is not None:
            weight = weight.reshape(-1).float()                     # [T]
    elif x.dim() == 3 and x.shape[0] != experts:
        raise ValueError(f"x has {x.shape[0]} experts but the Hessian has {experts}")
    elif x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, C] or [E, T, C] for a 3D Hessian, got {tuple(x.shape)}")
    if weight is not None:
        weight = weight.float()
        if weight.shape[-1] != x.shape[-2]:
            raise ValueError(f"weight has {weight.shape[-1]} tokens but x has {x.shape[-2]}")
    return x, weight


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """H += Σ_t c_t x_t x_tᵀ in fp32, in place; returns H (a RAW sum, not normalised).

    H: [C, C] or [E, C, C] fp32.  x: [..., C] tokens (for 3D H: [E, T, C] or shared [T, C]).
    weight: optional per-token weights c (>= 0): [...] for 2D H, [T] or [E, T] for 3D H.
    """
    if H.dtype != torch.float32:
        raise ValueError(f"H must be float32 for accumulation, got {H.dtype}")
    x, c = _weighted_tokens(x, weight, H.shape[0] if H.dim() == 3 else None)
    if c is None:
        xw = x
    elif c.dim() == 2 and x.dim() == 2:
        xw = x.unsqueeze(0) * c.unsqueeze(-1)                       # [E, T, C]
    else:
        xw = x * c.unsqueeze(-1)                                    # [T, C] or [E, T, C]
    # Σ_t c_t x_t x_tᵀ = (c ⊙ X)ᵀ X; one (batched) matmul, broadcast over experts
    H.add_(torch.matmul(xw.transpose(-1, -2), x).expand_as(H))
    return H


@dataclass
class HessianState:
    """Raw Hessian sums of one linear layer (or a stack of E experts).

    H:          [C, C] or [E, C, C] fp32, Σ_t c_t x_t x_tᵀ (raw, not normalised)
    n_tokens:   [] or [E] int64, tokens seen with c_t > 0 (all tokens without weights)
    weight_sum: [] or [E] float64, Σ_t c_t (= n_tokens without weights)
    All three are sums: add them across batches or DDP ranks, then `finalize`.
    """

    H: torch.Tensor
    n_tokens: torch.Tensor
    weight_sum: torch.Tensor

    @classmethod
    def zeros(cls, cols: int, experts: int | None = None, device=None) -> "HessianState":
        lead = () if experts is None else (experts,)
        return cls(H=torch.zeros(*lead, cols, cols, dtype=torch.float32, device=device),
                   n_tokens=torch.zeros(lead, dtype=torch.int64, device=device),
                   weight_sum=torch.zeros(lead, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> "HessianState":
        """Accumulate a batch of tokens (see `accumulate_hessian` for shapes)."""
        # a 2D Hessian of CUDA half-precision inputs on tensor cores (the non-expert linears of a layer: fp32 SIMT
        # matmuls of these took ~40 ms per pass on an H200); anything else, and every CPU input, bit for bit as before
        (accumulate_hessian_fast if self.H.dim() == 2 else accumulate_hessian)(self.H, x, weight)
        experts = self.H.shape[0] if self.H.dim() == 3 else None
        if weight is None:
            tokens = x.shape[-2] if experts is not None else x.numel() // x.shape[-1]
            self.n_tokens += tokens
            self.weight_sum += tokens
        else:
            c = _weighted_tokens(x[..., :1], weight, experts)[1]    # the weights' checks without a copy of x
            c = c.expand(*self.n_tokens.shape, c.shape[-1])         # [T] or [E, T]
            self.n_tokens += (c > 0).sum(-1)
            self.weight_sum += c.double().sum(-1)
        return self

    def merge(self, other: "HessianState") -> "HessianState":
        """Add another state's raw sums (what all_reduce(SUM) does across ranks)."""
        self.H += other.H
        self.n_tokens += other.n_tokens
        self.weight_sum += other.weight_sum
        return self

    def finalize(self) -> torch.Tensor:
        """Normalised Hessian 2/N Σ c x xᵀ (fp32); zero where an expert saw no tokens.

        A zero Hessian is how the solver learns that an expert got no tokens (it then falls
        back to round-to-nearest and says so), so it is kept zero rather than made up.
        """
        n = self.n_tokens.clamp(min=1).to(torch.float32)             # [] or [E]
        return self.H * (2.0 / n).reshape(*n.shape, 1, 1)


def _tf32_split(t: torch.Tensor):
    """t (fp32) = hi + lo with hi exactly representable in TF32 (10 mantissa bits)."""
    hi = (t.view(torch.int32) & -8192).view(torch.float32)             # clear the 13 low mantissa bits
    return hi, t - hi


class TF32:
    """Let fp32 matmuls use TF32 tensor cores inside the block (the global setting is restored after)."""

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)


_HALF_MM_FP32_OUT = [True]     # addmm(fp32, bf16, bf16, out_dtype=float32) available (checked on first use)


def _addmm_fp32(H: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """H += a @ b in place, a and b half precision, H float32 (exact products, fp32 accumulation): one GEMM whose
    epilogue adds H, instead of a float32 product in a temporary and an add kernel (bench/routed_hessian.py on an
    H200: the routed Hessians of an OLMoE layer's 64 experts 0.93x (2048 columns) and 0.80x (1024) the time, the
    same error against a float64 reference)."""
    torch.addmm(H, a, b, out_dtype=torch.float32, out=H)


def accumulate_hessian_fast(H: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`accumulate_hessian` for a 2D H on CUDA tensor cores, at fp32 accuracy.

    Taken when x is CUDA bf16/fp16. Its values are exact in that dtype, so X^T X as a half-precision
    matmul with float32 output has exact products and fp32 accumulation, at twice TF32's rate. A
    routing-weighted operand c*x (fp32) is split into hi + lo half-precision parts (two products,
    ~2^-17 relative error of each c*x, far below GPTQ's damping). Where the float32-output matmul
    is missing, the same split is done in TF32 (hi + lo with 10-bit mantissas). Anything else (CPU,
    fp32 inputs) takes `accumulate_hessian` unchanged, bit for bit.
    """
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and H.dim() == 2):
        return accumulate_hessian(H, x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    if _HALF_MM_FP32_OUT[0]:
        try:
            if weight is None:
                _addmm_fp32(H, x2.T, x2)
            else:
                # c*x = hi + lo, both half precision (~2^-17 relative error of each c*x), from one kernel
                hi, lo = split_weighted(x2, weight.reshape(-1))
                _add_split_products(H, hi, lo, x2)
            return H
        except (RuntimeError, TypeError, NotImplementedError):     # an older torch / GPU without it
            _HALF_MM_FP32_OUT[0] = False
    xf = x2.float()
    with TF32():
        if weight is None:
            H.addmm_(xf.T, xf)
        else:
            hi, lo = _tf32_split(xf * weight.reshape(-1, 1).float())
            H.addmm_(hi.T, xf)
            H.addmm_(lo.T, xf)
    return H


# rows of consecutive experts whose weighted operand is split in one launch: hi + lo of at most 2 x 2**26 elements
# (256 MiB in bf16) beside the layer's activations
SPLIT_CHUNK_ELEMS = 1 << 26


def _fast_weighted(x: torch.Tensor, H: torch.Tensor) -> bool:
    """accumulate_hessian_fast would take its half-precision weighted branch for every expert of H [E, C, C], and
    a run's hi/lo rows start 256-byte aligned as a fresh tensor's do (C % 128 == 0: the matmul library picks its
    kernel by the operands' alignment, so the same alignment keeps the same kernel, and the same bits)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and H.dim() == 3 and _HALF_MM_FP32_OUT[0]
            and x.shape[-1] % 128 == 0)


def _each_segment(H, x, counts, weight, e0: int, start: int) -> None:
    """H[e] += Σ c x xᵀ over expert e's rows, for e = e0, e0 + 1, ... (rows from `start`), one call each."""
    for e in range(e0, len(counts)):
        n = counts[e]
        if n:
            accumulate_hessian_fast(H[e], x[start:start + n], None if weight is None else weight[start:start + n])
        start += n


def _weighted_segments(H, x, counts, w) -> None:
    """`_each_segment` with weights, its c·x = hi + lo split done for runs of consecutive experts at once
    (SPLIT_CHUNK_ELEMS) instead of one launch per expert: the split is elementwise, so each expert's rows of a
    run's hi/lo are the very values of its own split, and its two products and additions are the same calls on
    the same values (views with the same strides) -- the same bits. 64 experts' down_proj inputs on an H200 made
    this loop host-bound (five launches per expert for ~0.13 ms of GPU work each)."""
    budget = max(1, SPLIT_CHUNK_ELEMS // max(1, x.shape[-1]))      # rows per split
    E, e, start = len(counts), 0, 0
    while e < E:
        j, rows = e, 0
        while j < E and (j == e or rows + counts[j] <= budget):
            rows += counts[j]
            j += 1
        hi, lo = split_weighted(x[start:start + rows], w[start:start + rows]) if rows else (None, None)
        off = 0
        for k in range(e, j):
            n = counts[k]
            if n:
                try:
                    _add_split_products(H[k], hi[off:off + n], lo[off:off + n], x[start + off:start + off + n])
                except (RuntimeError, TypeError, NotImplementedError):   # as accumulate_hessian_fast: an older
                    _HALF_MM_FP32_OUT[0] = False                       # torch / GPU; nothing of expert k added
                    _each_segment(H, x, counts, w, k, start + off)
                    return
            off += n
        start += rows
        e = j


def _add_split_products(H: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """H += hiᵀx, then H += loᵀx. A torch or GPU without the float32-output GEMM refuses the first call, before
    H changes (the second is the same call on operands of the same dtypes and layout)."""
    _addmm_fp32(H, hi.T, x)
    _addmm_fp32(H, lo.T, x)


def accumulate_segments(state: "HessianState", x_sorted: torch.Tensor, counts: list[int],
                        weight: torch.Tensor | None = None, experts: torch.Tensor | None = None) -> None:
    """All experts of a batched state at once: state.H[e] += Σ c x xᵀ over expert e's rows.

    x_sorted [N, C]: rows grouped by expert, counts[e] rows for expert e (host ints, in order).
    weight [N] (routing weights; None = 1) and experts [N] (expert of each row; needed with
    weights, for the token counts). One matmul per expert with rows, no host syncs. On CPU each
    expert's update is exactly `accumulate_hessian(H[e], rows, weights)`.
    """
    E = state.H.shape[0]
    if len(counts) != E or sum(counts) != x_sorted.shape[0]:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match H [{E}] and x {tuple(x_sorted.shape)}")
    if weight is not None and _fast_weighted(x_sorted, state.H):
        _weighted_segments(state.H, x_sorted, counts, weight.reshape(-1))
    else:
        _each_segment(state.H, x_sorted, counts, weight, 0, 0)
    if weight is None:
        cnt = torch.tensor(counts, dtype=torch.int64, device=state.n_tokens.device)
        state.n_tokens += cnt
        state.weight_sum += cnt.to(torch.float64)
    else:
        w = weight.reshape(-1).float()
        state.n_tokens.index_add_(0, experts, (w > 0).to(torch.int64))
        state.weight_sum.index_add_(0, experts, w.double())
