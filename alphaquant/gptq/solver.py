"""`gptq_quantize`: GPTQ (Frantar et al. 2022) on plain tensors, batched over experts.

    fmt = get_format("int4", group_size=128)
    res = gptq_quantize(W, H, fmt)            # W [E, R, C], H [E, C, C] (or [R, C], [C, C])
    res.weight                                # dequantized, W's shape and dtype
    res.qtensor.codes, res.qtensor.params     # for export, original column order
    res.fallback                              # e.g. [None, "no tokens", None, ...]

All E experts share ONE column sweep (a Python loop over columns, each step a handful of
batched kernels), which is what makes MoE layers fast on a GPU. Experts whose inputs are
the same share H: OLMoE's gate_proj and up_proj both read the block input, so stack them
along the rows, W = cat([gate, up], dim=1) [E, 2I, C], solve once, and split the result;
GPTQ treats rows independently, so this equals solving each alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alphaquant.formats.base import Format, QParams, QTensor

from . import fused_sweep
from .scale_search import MODES as SCALE_SEARCH_MODES
from .scale_search import choose_params
from .linalg import CHOLESKY_FAILED, NO_TOKENS, damped_inverse_factor_flipped
from .sweep import DynamicColumnParams, StaticColumnParams, cat_group_params, gptq_sweep, map_tensors


@dataclass
class GPTQResult:
    """What one `gptq_quantize` call returns. E = 1 for a 2D call.

    weight:   dequantized weight, the shape and dtype of the input W (identity formats:
              W cast to the format's dtype and back, i.e. unchanged for a bf16 W).
    qtensor:  codes + params for export, in the ORIGINAL column order (codes shaped like W,
              params [R, G] / [E, R, G]); for identity formats (bf16/fp16) fmt.quantize(W). With
              act_order and static_groups=False, params group k belongs to the columns
              whose g_idx is k (GPTQ-format semantics); otherwise groups are contiguous.
    perm:     [C] / [E, C] int64 processing order of the columns (act_order), else None.
    g_idx:    [C] / [E, C] int32 group of each original column (act_order), else None.
              With static groups it is simply column // group_size.
    loss:     [E] float32 GPTQ proxy loss Σ_j ||w_j - q_j||² / (2 [Hinv]_jj²), summed over
              rows; equals ½ tr(ΔW H_damped ΔWᵀ). For fallback experts it is computed with
              H = I (½ squared rounding error), as the given H could not be used.
    fallback: per expert None, "no tokens" (H == 0: round-to-nearest) or
              "cholesky failed" (not positive definite up to max_damp: round-to-nearest).
    damp:     [E] float32 relative damping λ actually used (0 for "no tokens"; for
              "cholesky failed" the last λ tried).
    """

    weight: torch.Tensor
    qtensor: QTensor | None
    perm: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss: torch.Tensor
    fallback: list
    damp: torch.Tensor


def _check_inputs(W: torch.Tensor, H: torch.Tensor, block_size: int, damp: float):
    """Validate shapes and values; returns W [E, R, C], H [E, C, C] (views)."""
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be [R, C] or [E, R, C], got shape {tuple(W.shape)}")
    C = W.shape[-1]
    if H.shape != (*W.shape[:-2], C, C):
        raise ValueError(f"H must be {(*W.shape[:-2], C, C)} for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}")
    if block_size < 1 or damp < 0:
        raise ValueError(f"block_size must be >= 1 and damp >= 0, got {block_size} and {damp}")
    W3, H3 = (W.unsqueeze(0), H.unsqueeze(0)) if W.dim() == 2 else (W, H)
    for name, t in (("W", W3), ("H", H3)):
        # max |t| per expert in one fused pass: NaN and Inf both propagate into it
        bad = ~torch.isfinite(torch.linalg.vector_norm(t, float("inf"), dim=(-2, -1)))  # [E]
        if bool(bad.any()):
            raise ValueError(f"{name} contains NaN or Inf (expert(s) {bad.nonzero().flatten().tolist()}); "
                             f"GPTQ needs finite weights and Hessians: check the calibration inputs")
    return W3, H3


def _prepare_hessian(H3: torch.Tensor, dtype, damp: float, max_damp: float, act_order: bool):
    """-> (Hinv [E, C, C] in processing order, perm [E, C] | None, damp_used [E], fallback).

    H3 is not modified. Besides it, at most two tensors of its size exist at once here: the dead-column-fixed
    copy in processing order is flipped and dropped before the Cholesky (a retry rebuilds its experts' rows
    from H3), then the Cholesky factor, its triangular inverse and Hinv follow one another."""
    E, C, _ = H3.shape
    empty = (H3 == 0).flatten(1).all(1)                                  # [E] no tokens
    perm = None
    if act_order:
        # descending diag(H) with dead columns as 1; stable so ties (e.g. dead columns) order the same everywhere
        d = H3.diagonal(dim1=-2, dim2=-1).to(dtype)
        perm = torch.argsort(d.masked_fill(d == 0, 1.0), dim=-1, descending=True, stable=True)
        del d

    def ordered(idx):
        """fix_dead_columns(H3[idx]) in processing order, no-token experts I: a fresh tensor."""
        H = H3 if idx is None else H3[idx]
        if perm is not None:
            p = perm if idx is None else perm[idx]
            k = p.shape[0]
            T = H.gather(1, p[:, :, None].expand(k, C, C))
            H = T.gather(2, p[:, None, :].expand(k, C, C))
            del T
        H = H.to(dtype, copy=H is H3)
        diag = H.diagonal(dim1=-2, dim2=-1)
        diag.masked_fill_(diag == 0, 1.0)
        H[empty if idx is None else empty[idx]] = torch.eye(C, dtype=dtype, device=H.device)
        return H

    first = [ordered(None)]
    mean_diag = first[0].diagonal(dim1=-2, dim2=-1).mean(-1)

    def flipped(idx):
        if idx is None:
            F = first.pop().flip(-2, -1)                                 # the ordered copy is dropped here
            return F
        return ordered(idx).flip(-2, -1)

    Hinv, damp_used, failed = damped_inverse_factor_flipped(flipped, mean_diag, damp, max_damp)
    Hinv[empty] = torch.eye(C, dtype=dtype, device=Hinv.device)         # plain RTN, loss under I
    damp_used[empty] = 0.0
    reasons = [NO_TOKENS if e else (CHOLESKY_FAILED if f else None)
               for e, f in zip(empty.tolist(), failed.tolist())]
    return Hinv, perm, damp_used, reasons


def _aligned_blocksize(block_size: int, g: int) -> int:
    """Block size whose block starts are group starts (or groups lie inside blocks).

    Dynamic groups read the next g columns when a group starts; they must already hold
    every earlier column's update, which the lazy block update only guarantees then.
    """
    if block_size % g == 0 or g % block_size == 0:
        return block_size
    return g * (block_size // g) if g < block_size else math.gcd(g, block_size)


def _identity_result(W: torch.Tensor, fmt: Format, E: int) -> GPTQResult:
    """bf16/fp16: nothing to solve; the weight only takes the storage dtype's rounding."""
    zeros = torch.zeros(E, dtype=torch.float32, device=W.device)
    return GPTQResult(weight=fmt.fake_quantize(W), qtensor=fmt.quantize(W), perm=None, g_idx=None,
                      loss=zeros, fallback=[None] * E, damp=zeros.clone())


MAX_DAMP = 1.0
"""The largest damping λ a failed Cholesky is retried with (×10 per retry) before round-to-nearest."""


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: Format, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = True,
                  max_damp: float = MAX_DAMP, cuda_graph: bool | None = None,
                  fused: bool | None = None, scale_search: str = "none") -> GPTQResult:
    """Quantize W [R, C] / [E, R, C] to `fmt` with GPTQ, given H [C, C] / [E, C, C].

    H is the (normalised) Hessian 2/N Σ c x xᵀ of the layer inputs, see `HessianState`;
    its scale does not matter. block_size: columns per lazy batch. damp: λ of the
    damping λ·mean(diag H)·I, raised ×10 per expert up to max_damp when a Cholesky fails.
    act_order: process columns by descending diag(H). static_groups: group params from
    the original W (True) or from the error-updated W at each group's first column.
    cuda_graph: replay the column loop of each block as a CUDA graph (None: on for CUDA
    tensors with static groups; same results, far fewer launches).
    fused: run each lazy block as one Triton kernel (gptq/fused_sweep.py; None: on where
    it applies: CUDA, Triton importable, static groups, a format with an elementwise
    rounding, block_size <= 256); equal to the torch sweep up to float32 rounding.
    scale_search: how group params are chosen (gptq/scale_search.py): "none" = fmt.params,
    "mse" = each group's range shrunk to its least rounding error, "mse_hdiag" = the same
    error weighted per column by diag(H). Only the choice of params changes, so the fused
    sweep and export round against them as against any params.
    Computes in float32 (float64 if W or H is float64). Raises ValueError on NaN/Inf.
    """
    W3, H3 = _check_inputs(W, H, block_size, damp)
    E, R, C = W3.shape
    if fmt.is_identity:
        return _identity_result(W, fmt, E)
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    g = fmt.group_len(C)
    Hinv, perm, damp_used, reasons = _prepare_hessian(H3, dtype, damp, max_damp, act_order)
    order = perm if act_order else torch.arange(C, device=W.device).expand(E, C)   # [E, C]
    Wf = W3.to(dtype)                                                    # [E, R, C]
    Wt = Wf.transpose(1, 2).gather(1, order[:, :, None].expand(E, C, R)).contiguous()  # [E, C, R]
    if scale_search not in SCALE_SEARCH_MODES:
        raise ValueError(f"scale_search must be one of {', '.join(SCALE_SEARCH_MODES)}; got {scale_search!r}")
    hdiag = H3.diagonal(dim1=-2, dim2=-1).to(dtype).unsqueeze(1) if scale_search == "mse_hdiag" else None  # [E, 1, C]
    if static_groups:
        p_static = choose_params(fmt, Wf, scale_search, hdiag)           # [E, R, G]
        colparams = StaticColumnParams(p_static, order // g)
        blocksize = block_size
    else:
        colparams = (DynamicColumnParams(fmt, g) if scale_search == "none" else
                     _SearchedDynamicParams(fmt, g, scale_search, None if hdiag is None else hdiag.gather(-1, order[:, None, :])))
        blocksize = _aligned_blocksize(block_size, g)
    can_fuse = static_groups and dtype == torch.float32 and fused_sweep.supports(fmt, W.device, blocksize)
    if fused and not can_fuse:
        raise ValueError("fused=True needs CUDA tensors, Triton, static_groups=True, block_size <= "
                         f"{fused_sweep.MAX_BLOCK} and a format with an elementwise rounding ({fmt.name})")
    if cuda_graph is None:
        cuda_graph = W.is_cuda and static_groups
    if cuda_graph and not (W.is_cuda and static_groups):
        raise ValueError("cuda_graph=True needs CUDA tensors and static_groups=True")
    if can_fuse if fused is None else fused:
        Qt, loss = fused_sweep.fused_gptq_sweep(Wt, Hinv, fmt.elementwise_rounding(), p_static, order // g, blocksize)
    else:
        Qt, loss = gptq_sweep(Wt, Hinv, fmt, colparams, blocksize, cuda_graph)
    # the sweep's inputs are spent (Wt holds only lazy-update leftovers): free them before the result and the
    # codes are built, so the solve's peak is the sweep's and not sweep + encode (gptq.expert_chunk auto and
    # memory_plan count SOLVE_WEIGHT_COPIES working [R, C] tensors per stack)
    del Wt, Wf, Hinv
    inv = torch.argsort(order, dim=-1)                                   # [E, C] position of each column
    Q = Qt.gather(1, inv[:, :, None].expand(E, C, R)).transpose(1, 2).contiguous()  # [E, R, C] original order
    if static_groups:
        del Qt
        params, codes = p_static, fmt.encode(Q, p_static)
    else:
        # groups are contiguous in processing order: encode there, then un-permute codes
        params = cat_group_params(colparams.groups)
        codes = fmt.encode(Qt.transpose(1, 2), params).gather(-1, inv[:, None, :].expand(E, R, C))
    g_idx = (torch.arange(C, device=W.device).expand(E, C) if static_groups else inv) // g
    out = _squeeze if W.dim() == 2 else (lambda t: t)
    return GPTQResult(
        weight=out(Q).to(W.dtype),
        qtensor=QTensor(out(codes), map_tensors(params, out), tuple(W.shape), fmt.name),
        perm=out(perm) if act_order else None,
        g_idx=out(g_idx).to(torch.int32) if act_order else None,
        loss=loss.float(), fallback=reasons, damp=damp_used)


class _SearchedDynamicParams(DynamicColumnParams):
    """Dynamic groups whose params come from scale_search (hdiag [E, 1, C] in processing order)."""

    def __init__(self, fmt: Format, g: int, mode: str, hdiag: torch.Tensor | None):
        super().__init__(fmt, g)
        self.mode, self.hdiag = mode, hdiag

    def column(self, Wt: torch.Tensor, j: int, i: int) -> QParams:
        if j % self.g == 0:
            group = Wt[:, j:j + self.g].transpose(1, 2).contiguous()     # [E, R, g]
            w = None if self.hdiag is None else self.hdiag[..., j:j + self.g]
            self.groups.append(choose_params(self.fmt, group, self.mode, w))   # [E, R, 1]
        return self.groups[-1]


def _squeeze(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(0) if t.dim() > 0 else t
