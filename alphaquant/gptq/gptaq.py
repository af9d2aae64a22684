"""Asymmetric calibration (GPTAQ, Li et al. 2025, "GPTQv2"): the target of a solve is the full-precision
layer's output on the full-precision inputs, not the layer's output on the quantized model's inputs.

For a linear with fp weights W [R, C], the inputs X it sees in the unquantized model and the inputs X̃
it sees with every earlier module quantized (token-aligned columns, token weights c_t), the objective

    min_Q  Σ_t c_t ||Q x̃_t − W x_t||²  (+ λ ||Q − W||²_F, the damping GPTQ adds)

is, exactly, (Q − W̃) (H + λI) (Q − W̃)ᵀ + const with H = Σ c x̃ x̃ᵀ, P = Σ c (x − x̃) x̃ᵀ and

    W̃ = W (H + P + λI) (H + λI)⁻¹ = W + W P (H + λI)⁻¹.

So GPTQ on (W̃, H) -- the unchanged solver, its act order, scale search and fused sweep included --
minimises the asymmetric objective: this module only accumulates P (beside H, the same tokens and
weights) and computes W̃ (`asymmetric_target`), with λ = damp · mean(diag H) as `gptq_quantize` damps.

GPTAQ's reference code folds the same correction into the column sweep instead (each column's share
`W P H⁻¹`, restricted to the columns after it through the Cholesky factor, added as the sweep passes)
and scales it by α = 0.25. The pre-correction here minimises the same objective with the same greedy
column order; it starts the sweep from the asymmetric optimum W̃ instead of W (so the first columns
are rounded from their corrected values too) and keeps the pure solver untouched. `alpha` scales the
correction as GPTAQ's α does (1 = the exact asymmetric objective, 0 = plain GPTQ).
"""
from __future__ import annotations

import torch

from .linalg import fix_dead_columns


def accumulate_cross(P: torch.Tensor, x_fp: torch.Tensor, x_q: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """P += Σ_t c_t (x_fp_t − x_q_t) x_q_tᵀ in P's dtype (fp32 in the pipeline), in place (a RAW sum like
    `HessianState.H`); returns P.

    P [C, C]; x_fp, x_q [..., C] token-aligned (every leading dim a token dim); weight [...] or None.
    """
    xq = x_q.reshape(-1, x_q.shape[-1]).to(P.dtype)
    d = x_fp.reshape(-1, x_fp.shape[-1]).to(P.dtype) - xq                      # [T, C]
    if weight is not None:
        d = d * weight.reshape(-1, 1).to(P.dtype)
    P.add_(d.T @ xq)
    return P


def accumulate_cross_segments(P: torch.Tensor, x_fp_sorted: torch.Tensor, x_q_sorted: torch.Tensor,
                              counts: list[int], weight: torch.Tensor | None = None) -> None:
    """All experts at once: P[e] += Σ c (x_fp − x_q) x_qᵀ over expert e's rows (rows grouped by expert,
    counts[e] of them, as `accumulate_segments` takes them)."""
    if len(counts) != P.shape[0] or sum(counts) != x_q_sorted.shape[0] or x_fp_sorted.shape != x_q_sorted.shape:
        raise ValueError(f"counts {len(counts)} experts / {sum(counts)} rows do not match P [{P.shape[0]}], "
                         f"x_q {tuple(x_q_sorted.shape)} and x_fp {tuple(x_fp_sorted.shape)}")
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            accumulate_cross(P[e], x_fp_sorted[rows], x_q_sorted[rows], None if weight is None else weight[rows])
        start += n


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, P: torch.Tensor, damp: float = 0.01,
                      alpha: float = 1.0) -> torch.Tensor:
    """W̃ = W + α · W P (H + λI)⁻¹, λ = damp · mean(diag H) per expert (dead columns set to 1 first, as
    the solver does): the weights GPTQ on H must approach to minimise Σ c ||Q x̃ − W x||² + λ||Q − W||².

    W [E, R, C] / [R, C]; H, P [E, C, C] / [C, C] with the same normalisation (both raw sums, or both
    finalised with the same 2/N). Experts with H == 0 (no tokens), P == 0 (inputs equal: nothing quantized
    before them) or a failed Cholesky keep W exactly. Float32 (float64 if any input is float64).
    """
    squeeze = W.dim() == 2
    W3, H3, P3 = (W.unsqueeze(0), H.unsqueeze(0), P.unsqueeze(0)) if squeeze else (W, H, P)
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype, P.dtype) else torch.float32
    Hd = fix_dead_columns(H3.to(dtype))
    C = Hd.shape[-1]
    Hd = Hd + (damp * Hd.diagonal(dim1=-2, dim2=-1).mean(-1))[:, None, None] * torch.eye(C, dtype=dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(Hd)
    Wf = W3.to(dtype)
    # W P Hd⁻¹ = (Hd⁻¹ Pᵀ Wᵀ)ᵀ, Hd symmetric
    shift = torch.cholesky_solve((Wf @ P3.to(dtype)).transpose(-1, -2), L).transpose(-1, -2)    # [E, R, C]
    keep = (info != 0) | (H3 == 0).flatten(1).all(1) | (P3 == 0).flatten(1).all(1)
    keep = keep | ~torch.isfinite(shift).flatten(1).all(1)
    out = torch.where(keep[:, None, None], Wf, Wf + alpha * shift).to(W.dtype)
    return out.squeeze(0) if squeeze else out
