"""Hessian preparation for the GPTQ sweep, batched over experts.

From H [E, C, C] this builds the upper Cholesky factor of the damped inverse Hessian,
Hinv [E, C, C], deciding per expert:
- no tokens (H == 0 everywhere): Hinv = I, so the sweep reduces to round-to-nearest;
- dead columns (diag H == 0, an input channel that was always zero): H[i, i] = 1, as in
  the GPTQ reference; the column is still rounded to the grid, its error stays local;
- damping λ·mean(diag H)·I, λ = `damp`; if the Cholesky of an expert fails, λ is raised
  ×10 for that expert (up to `max_damp`), after which it falls back to round-to-nearest.
"""
from __future__ import annotations

import torch

NO_TOKENS = "no tokens"
CHOLESKY_FAILED = "cholesky failed"


def upper_cholesky_of_inverse(H: torch.Tensor):
    """(U, info): U upper triangular with Uᵀ U = H⁻¹, for SPD H [E, C, C].

    The GPTQ reference takes three O(C³) steps (cholesky, cholesky_inverse, cholesky
    upper). With J the flip (reversal) matrix, if J H J = L Lᵀ then
    H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper triangular with a positive diagonal,
    hence it IS the upper Cholesky factor of H⁻¹: one Cholesky and one triangular
    inverse, about half the flops, and only one factorisation that can fail.
    info [E] int: nonzero where H was not positive definite.
    """
    return _upper_inverse_of_flipped(H.flip(-2, -1))


def _upper_inverse_of_flipped(F: torch.Tensor, shift: torch.Tensor | None = None):
    """`upper_cholesky_of_inverse(J F J + shift·I)` from F = J H J, a tensor this function owns (its diagonal
    is damped in place: J (H + sI) J = J H J + sI). Each O(C²) intermediate is dropped as soon as the next
    exists, so at most two of F's size live here at once (F or L, then L or L⁻¹, then L⁻¹ or U)."""
    if shift is not None:
        F.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    L, info = torch.linalg.cholesky_ex(F)                               # [E, C, C] lower
    del F
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)          # [E, C, C] lower
    del L, eye
    U = Linv.flip(-2, -1)
    del Linv
    bad = (info != 0) | ~torch.isfinite(torch.linalg.vector_norm(U, float("inf"), dim=(-2, -1)))
    return U, bad


def fix_dead_columns(H: torch.Tensor) -> torch.Tensor:
    """H [E, C, C] -> copy with H[i, i] = 1 where diag H == 0 (unseen input channels)."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)                                 # [E, C] view
    diag.masked_fill_(diag == 0, 1.0)
    return H


def damped_inverse_factor(H: torch.Tensor, damp: float, max_damp: float, damp_step: float = 10.0):
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ per expert, with fallbacks.

    H: [E, C, C] (dead columns already fixed; experts with no tokens already set to I).
    Returns (Hinv [E, C, C], damp_used [E] float32, failed [E] bool). Failed experts get
    Hinv = I (round-to-nearest in the sweep); their damp_used is the last λ tried.
    Host syncs happen here (once per damping attempt), never inside the column sweep.
    """
    return damped_inverse_factor_flipped(lambda idx: (H if idx is None else H[idx]).flip(-2, -1),
                                         H.diagonal(dim1=-2, dim2=-1).mean(-1), damp, max_damp, damp_step)


def damped_inverse_factor_flipped(flipped, mean_diag: torch.Tensor, damp: float, max_damp: float,
                                  damp_step: float = 10.0):
    """`damped_inverse_factor` of an H given as `flipped(idx)` -> J H[idx] J, a fresh tensor this function
    consumes (idx None: every expert; else an index tensor of the experts whose Cholesky is retried), and
    mean_diag [E] = H.diagonal(dim1=-2, dim2=-1).mean(-1). The solver builds J H J straight from the
    collected Hessians (gptq/solver.py), so no undamped or damped full copy of H is kept beside it."""
    E, dtype, device = mean_diag.shape[0], mean_diag.dtype, mean_diag.device
    lam = torch.full((E,), damp, dtype=dtype, device=device)          # [E]
    Hinv, todo = None, None                                            # todo None: every expert
    while True:
        idx = torch.arange(E, device=device) if todo is None else todo
        U, bad = _upper_inverse_of_flipped(flipped(todo), lam[idx] * mean_diag[idx])
        if Hinv is None:
            Hinv = U
        else:
            Hinv[todo] = U
        del U
        next_lam = lam[idx] * damp_step
        retry = bad & (next_lam <= max_damp * (1 + 1e-6))
        if not bool(retry.any()):
            break
        lam[idx[retry]] = next_lam[retry]
        todo = idx[retry]
    failed = torch.zeros(E, dtype=torch.bool, device=device)
    failed[idx[bad]] = True
    Hinv[failed] = torch.eye(Hinv.shape[-1], dtype=Hinv.dtype, device=device)
    return Hinv, lam.float(), failed
