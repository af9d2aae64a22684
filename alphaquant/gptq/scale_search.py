"""MSE-optimal group scales: shrink each group's range over a grid, keep the least rounding error.

    fmt = get_format("int3", group_size=64)
    p = search_params(fmt, W)                       # W [..., C]; QParams as fmt.params(W) gives them
    p = search_params(fmt, W, col_weight=diag_H)    # error weighted per column, diag_H [..., C]

The range a format takes from a group's extremes (amax for symmetric ints and MX, [min, max] for
asymmetric ints) is usually wider than the one that rounds the group best: one outlier stretches
the step for all g elements. As GPTQ's reference code (`Quantizer.find_params(mse=True)`),
GPTQModel's and llm-compressor's `mse` observers do, we try the ranges p·[lo, hi] for
p = 1, 1 - 1/grid, ... down to 1 - maxshrink (1.00, 0.99, ..., 0.21 by default) and keep, per
group, the one whose rounding error Σ |w - q(w)|^norm is least (norm 2.4 as those observers).
Ties keep the wider range, so a group where shrinking never helps gets exactly fmt.params(W).

Every candidate is the format's OWN params of the range-clamped group, fmt.params(clamp(w, p·lo,
p·hi)): the clamp makes the group's extremes exactly p·lo and p·hi, so scales, zero points, E8M0
exponents and their rounding to the stored dtype are the format's arithmetic, bit for bit. The
chosen params are therefore ordinary params of the format: `round_with`, `encode`, export and the
fused Triton sweep (which rounds against static params given to it) need nothing new.

NVFP4 is the exception: its per-matrix global scale comes from the matrix's amax, which a clamp of
the largest group would move; there the global scale of the unclamped matrix is kept and only the
FP8 block scales are searched (`_nvfp4_candidate`, the format's block-scale formula with amax·p).
Formats whose params are not per group (fp8_e4m3 per row is per "group" of one row and works the
same) and identity formats (bf16) are returned as fmt.params gives them.

col_weight [..., C] (optional, >= 0): weights the error of each column, e.g. diag(H) (how much the
layer output moves per unit of error in that column), the "mse_hdiag" mode of the solver.

On CUDA, int and MX formats take fused_scale_search instead of the loop below: one Triton kernel,
the same candidates and params arithmetic, each group read once (the loop is the reference and the
CPU path).
"""
from __future__ import annotations

import torch

from alphaquant.formats.base import Format, QParams, exact_div

from . import fused_scale_search

GRID = 100
MAX_SHRINK = 0.8
NORM = 2.4
MODES = ("none", "mse", "mse_hdiag")


def _per_group(p: QParams) -> list[str]:
    """Names of the per-group tensors of p (those shaped like the scale), 'scale'/'zero'/'extra.KEY'."""
    names = ["scale"] + (["zero"] if p.zero is not None else [])
    return names + [f"extra.{k}" for k, v in p.extra.items()
                    if torch.is_tensor(v) and v.shape == p.scale.shape]


def _get(p: QParams, name: str) -> torch.Tensor:
    return p.extra[name[6:]] if name.startswith("extra.") else getattr(p, name)


def _select(best: QParams, cand: QParams, better: torch.Tensor) -> QParams:
    """Per group, cand's tensors where `better` [..., G], else best's (float8 extras moved as bytes)."""
    out = QParams(best.scale, best.zero, dict(best.extra))
    for name in _per_group(best):
        b, c = _get(best, name), _get(cand, name)
        if b.dtype.is_floating_point and b.element_size() == 1:          # float8 has no where kernel
            v = torch.where(better, c.view(torch.uint8), b.view(torch.uint8)).view(b.dtype)
        else:
            v = torch.where(better, c, b)
        if name == "scale":
            out.scale = v
        elif name == "zero":
            out.zero = v
        else:
            out.extra[name[6:]] = v
    return out


def _nvfp4_candidate(fmt, base: QParams, amax_p: torch.Tensor) -> QParams:
    """NVFP4 params with base's global scale and block scales from the shrunk block amax [..., R, G]
    (nvfp4.NVFP4Format.params' block-scale lines with amax_block -> amax_block * p)."""
    from alphaquant.formats.floatgrid import E2M1
    from alphaquant.formats.nvfp4 import FP8_EPS, FP8_MAX

    wgs = base.extra["weight_global_scale"]
    wgs_b = wgs.reshape(wgs.shape + (1,) * (amax_p.dim() - wgs.dim()))
    block = exact_div(amax_p, E2M1.max) * wgs_b
    block_f = block.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
    block_f = torch.where(block_f == 0, torch.full_like(block_f, FP8_EPS), block_f)
    return QParams(block_f / wgs_b, None, {**base.extra, "block_scale_fp8": block_f.to(torch.float8_e4m3fn)})


def group_error(fmt: Format, w: torch.Tensor, p: QParams, col_weight: torch.Tensor | None = None,
                norm: float = NORM) -> torch.Tensor:
    """Σ over each group of col_weight · |w - round_with(w, p)|^norm: float32 [..., G]."""
    d = (fmt.round_with(w.float(), p) - w.float()).abs().pow(norm)       # [..., C]
    if col_weight is not None:
        d = d * col_weight
    return d.unflatten(-1, (p.scale.shape[-1], -1)).sum(-1)


def search_params(fmt: Format, w: torch.Tensor, col_weight: torch.Tensor | None = None, *,
                  grid: int = GRID, max_shrink: float = MAX_SHRINK, norm: float = NORM,
                  fused: bool | None = None) -> QParams:
    """Params of fmt for w [..., C] with each group's range shrunk to its least rounding error.

    col_weight: [..., C] (broadcastable) non-negative weight of each column's error, or None.
    Candidates p = 1 - i / grid for i = 0 .. int(max_shrink * grid) - 1; the first (p = 1) is
    fmt.params(w) itself, and a later one replaces it only where its error is strictly smaller.
    fused: None = the one-kernel Triton search (fused_scale_search) where it supports fmt and w
    (int and MX formats on CUDA), else this torch loop; False = always this loop; True = the kernel
    or a ValueError. Both give the same params; only near-ties of the error sum may pick differently.
    """
    if fused is not False and fused_scale_search.supports(fmt, w, col_weight):
        return fused_scale_search.search_params(fmt, w, col_weight, grid=grid, max_shrink=max_shrink, norm=norm)
    if fused:
        raise ValueError(f"fused=True needs Triton with a CUDA tensor and an int or MX format that "
                         f"fused_scale_search supports; got {fmt!r} on {w.device} ({w.dtype})")
    base = fmt.params(w)
    if fmt.is_identity:
        return base
    wg = fmt.split_groups(w)                                             # float32 [..., G, g]
    if base.scale.shape != wg.shape[:-1]:                                # not one param set per group
        return base
    nvfp4 = "weight_global_scale" in base.extra
    lo = wg.amin(-1, keepdim=True).clamp(max=0)                          # [..., G, 1]
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    amax = torch.maximum(-lo, hi).squeeze(-1)                            # [..., G]
    best, best_err = base, group_error(fmt, w, base, col_weight, norm)
    for i in range(1, int(max_shrink * grid)):
        p = 1 - i / grid
        if nvfp4:
            cand = _nvfp4_candidate(fmt, base, amax * p)
        else:   # the format's own params of the group clamped to p·[lo, hi]: extremes exactly p·lo, p·hi
            cand = fmt.params(torch.clamp(wg, lo * p, hi * p).flatten(-2))
        err = group_error(fmt, w, cand, col_weight, norm)
        better = err < best_err
        best, best_err = _select(best, cand, better), torch.where(better, err, best_err)
    return best


def choose_params(fmt: Format, w: torch.Tensor, mode: str, col_weight: torch.Tensor | None = None) -> QParams:
    """The solver's entry: mode none -> fmt.params(w); mse -> search_params; mse_hdiag -> weighted by
    col_weight (diag H), which the caller must give."""
    if mode == "none":
        return fmt.params(w)
    if mode == "mse":
        return search_params(fmt, w)
    if mode == "mse_hdiag":
        if col_weight is None:
            raise ValueError("scale_search 'mse_hdiag' needs col_weight (the Hessian diagonal)")
        return search_params(fmt, w, col_weight)
    raise ValueError(f"scale_search must be one of {', '.join(MODES)}; got {mode!r}")
