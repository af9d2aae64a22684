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
    L, info = torch.linalg.cholesky_ex(H.flip(-2, -1))                 # [E, C, C] lower
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device).expand_as(H)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)          # [E, C, C] lower
    U = Linv.flip(-2, -1)
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
    E, C, _ = H.shape
    lam = torch.full((E,), damp, dtype=H.dtype, device=H.device)       # [E]
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)                  # [E]
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    Hinv = torch.empty_like(H)
    todo = torch.arange(E, device=H.device)                            # experts not yet solved
    while True:
        Hd = H[todo] + (lam[todo] * mean_diag[todo])[:, None, None] * eye
        U, bad = upper_cholesky_of_inverse(Hd)
        Hinv[todo] = U
        next_lam = lam[todo] * damp_step
        retry = bad & (next_lam <= max_damp * (1 + 1e-6))
        if not bool(retry.any()):
            break
        lam[todo[retry]] = next_lam[retry]
        todo = todo[retry]
    failed = torch.zeros(E, dtype=torch.bool, device=H.device)
    failed[todo[bad]] = True
    Hinv[failed] = eye
    return Hinv, lam.float(), failed
