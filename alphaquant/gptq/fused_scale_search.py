"""The MSE scale search (`scale_search.search_params`) as ONE Triton kernel (CUDA, int and MX formats).

The torch search tries every shrink factor p = 1 - i/grid (80 of them by default) as a round of
full-tensor passes: clamp the groups to p·[lo, hi], take the format's params of the clamped
tensor, round the whole weight with them, |w - q|^2.4, sum per group, select. On one H200 that is
~1.3 s per OLMoE layer (~400M weights), paid in every layer of every solve because `mse` is the
default `gptq.scale_search`. Here one program owns BLOCK_G whole groups: it loads the
[BLOCK_G, g] tile (and the column weights) once, keeps it in registers, and for each candidate
computes the candidate's params per group, rounds the tile, and keeps per group the least error
and the params that gave it. The weights are read once instead of ~400 times. For MX formats a
block's params are its E8M0 exponent alone, which takes only ~4 values over the 80 candidates: the
kernel scores each exponent once and maps the winner back to its first candidate (same answer).

What is exact (bit for bit equal to the torch search's arithmetic):
- The candidate range: the group extremes lo = min(min(w), 0), hi = max(max(w), 0) times p,
  float32 products with p the float32 value torch casts the python float 1 - i/grid to (a table
  built once, `candidates`). That is what the torch search's clamp makes the clamped group's
  extremes, so the format's params of the clamped group are a function of (lo·p, hi·p) alone.
- The params formula of the format, as IntFormat.params / MXFormat.params compute it: true
  divisions (div_rn, as exact_div), the scale rounded to float16 / bfloat16 from its bits
  (saturating, 0 -> eps; `_round_scale`), the asymmetric zero from the UNROUNDED scale;
  MX: the E8M0 exponent from the exponent bits of amax ("floor" and "ceil" modes).
- The rounding of every element: fused_sweep._round, the same operations in the same order
  as round_with (tests/test_gptq_fused.py checks it against round_with for every format).
  The kernel is compiled with enable_fp_fusion=False, so no multiply-add is contracted into an
  FMA (hi·p - lo·p would otherwise round once instead of twice).
What may differ: the error sum. |d|^norm is exp2(norm·log2|d|) (hardware approximations on a
GPU) and the sum runs in the tile's order, so two candidates whose errors are within ~1e-6
relative may be ordered differently: a near-tie may pick the other one (the tests bound how
often, and that the torch errors of the two picks agree to 1e-5). Exact ties (candidates with
identical params, hence identical rounding) keep the earlier, wider range, as the torch search;
candidate 0 (fmt.params) stands where every error is inf or NaN, as there.

Formats: IntFormat (symmetric and asymmetric, scale_dtype float16 / bfloat16 / float32) and
MXFormat (every element grid and MXINT8, both scale modes); weights float32 / float16 /
bfloat16 on CUDA; any group length up to MAX_GROUP (a power of two fills the tile; others,
per-channel groups included, are padded with masked zeros). Everything else (NVFP4, fp8,
float64, check_finite=False) keeps the torch search; so does the CPU unless Triton's
interpreter is on (TRITON_INTERPRET=1, as fused_sweep), which is how the tests run the kernel.

    # when supports(fmt, w, col_weight); scale_search.search_params dispatches here by itself
    p = fused_scale_search.search_params(fmt, w, col_weight, grid=100, max_shrink=0.8, norm=2.4)
    p, idx = fused_scale_search.search(fmt, w, col_weight, grid=100, max_shrink=0.8, norm=2.4)  # + idx [..., G]
"""
from __future__ import annotations

import math

import torch

from alphaquant.formats.base import QParams
from alphaquant.formats.integer import IntFormat
from alphaquant.formats.mx import MXFormat

from .fused_sweep import INTERPRETED, KINDS, available, triton

if triton is not None:
    import triton.language as tl

    from .fused_sweep import _rint, _round  # noqa: F401  (jit helpers the kernel calls)

MAX_GROUP = 4096
"""Longest group the kernel holds in one program's tile; longer groups keep the torch search."""
TILE = 1024
"""Elements per program on a GPU (BLOCK_G = TILE // g groups, at least one group)."""
ELEMS_PER_THREAD = 8
"""Tile elements a thread holds (num_warps = tile / (32 * this), 4 .. 16). ptxas (sm_90a) puts the
kernel at ~115 registers and no spills with 8 (~60 with 4, ~210 with 16): the compiler keeps every
element's temporaries live, so the tile a thread holds sets the occupancy. Not yet tuned on a GPU
(bench/scale_search.py sweeps TILE and this)."""
FAST_LOG2 = True
"""CUDA only: log2|d| by the hardware's lg2.approx.f32 (inline PTX, abs error ~2^-22) instead of Triton's precise
software log2. The kernel is compute-bound (an H200 took ~70 ms per OLMoE layer for every TILE tried); the static
SASS of the candidate loop (int4 g128, sm_90a, 8 elements a thread) goes from 875 to 674 instructions, and on an
H200 (bench/scale_search.py, 2026-12-02) int4 g128 took 47.6 ms instead of 70.2 (asym 55.8 / 78.3, mxfp4 8.7 /
10.1) with the same share of groups picking torch's params (99.9990 % against 99.9989 %). The error sums differ
from torch's by ~1e-6 relative instead of ~1e-7: only near-ties can change, and params stay exact. False: the
precise log2 (the interpreter always uses it)."""
INTERPRETER_TILE = 32768
"""Triton's interpreter runs programs one after another with numpy: fewer, larger ones are faster."""
SCALE_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_CANDIDATES: dict = {}


def candidates(grid: int, max_shrink: float, device) -> torch.Tensor:
    """float32 [n] p_i = 1 - i/grid for i = 0 .. int(max_shrink*grid) - 1: the torch search's python floats,
    cast to float32 as torch casts a python scalar multiplying a float32 tensor (cached per device)."""
    key = (grid, max_shrink, torch.device(device))
    if key not in _CANDIDATES:
        n = max(1, int(max_shrink * grid))
        _CANDIDATES[key] = torch.tensor([1 - i / grid for i in range(n)], dtype=torch.float32, device=device)
    return _CANDIDATES[key]


def supports(fmt, w: torch.Tensor, col_weight: torch.Tensor | None = None) -> bool:
    """Whether the fused search can run this format on this tensor (else the torch search)."""
    kind = "cpu" if INTERPRETED else "cuda"
    if not (available() and torch.is_tensor(w) and w.device.type == kind and w.dim() >= 1 and w.numel() > 0
            and w.dtype in WEIGHT_DTYPES and getattr(fmt, "check_finite", False)):
        return False
    if type(fmt) is IntFormat:
        if fmt.scale_dtype not in SCALE_ROUNDING:
            return False
    elif type(fmt) is not MXFormat or fmt.scale_mode not in ("floor", "ceil"):
        return False
    C = w.shape[-1]
    g = C if fmt.group_size in (-1, 0, None) else fmt.group_size
    if g <= 0 or C % g != 0 or g > MAX_GROUP:
        return False
    if col_weight is not None:
        if not torch.is_tensor(col_weight) or col_weight.device != w.device or col_weight.dtype not in WEIGHT_DTYPES:
            return False
        try:                                   # d * col_weight must keep d's shape, as in group_error
            if torch.broadcast_shapes(col_weight.shape, w.shape) != w.shape:
                return False
        except RuntimeError:
            return False
    return True


if triton is not None:
    @triton.jit
    def _pow2(e):
        """2^e for int32 e in [-149, 127] as exact float32 from bits (floatgrid.pow2)."""
        normal = (tl.maximum(e + 127, 1) << 23).to(tl.float32, bitcast=True)
        sub = (tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
        return tl.where(e >= -126, normal, sub)

    @triton.jit
    def _round_scale(s, SCALE_ROUND: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr):
        """integer.round_scale for s >= 0: clamp to the dtype's finite max, round half to even to
        the dtype (0: float32, 1: float16, 2: bfloat16), back to float32; 0 -> the dtype's eps."""
        s = tl.minimum(s, FMAX)
        if SCALE_ROUND == 1:       # float16 as an element grid: 10 mantissa bits, binades from 2^-14
            kb = tl.maximum(s.to(tl.int32, bitcast=True) >> 23, 113)
            inv_quantum = ((264 - kb) << 23).to(tl.float32, bitcast=True)         # 2^(10 - k)
            quantum = ((kb - 10) << 23).to(tl.float32, bitcast=True)              # 2^(k - 10)
            s = _rint(s * inv_quantum) * quantum                                   # exact products
        elif SCALE_ROUND == 2:     # bfloat16: drop 16 bits, half to even (subnormals alike)
            b = s.to(tl.int32, bitcast=True)
            b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
            s = b.to(tl.float32, bitcast=True)
        return tl.where(s == 0.0, EPS, s)

    @triton.jit
    def _params(lo_p, hi_p, FAMILY: tl.constexpr, HAS_ZERO: tl.constexpr, LEVELS: tl.constexpr,
                SCALE_ROUND: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr, EMAX: tl.constexpr,
                CEIL: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, VMAX: tl.constexpr):
        """(scale, zero, E8M0 code) of a group whose extremes are lo_p <= 0 <= hi_p: the format's params
        formula (FAMILY 0: IntFormat.params, 1: MXFormat.params); zero is 0 and code 0 where unused."""
        z = tl.zeros(lo_p.shape, tl.float32)
        code = tl.zeros(lo_p.shape, tl.int32)
        if FAMILY == 0:
            if HAS_ZERO:
                raw = tl.div_rn(hi_p - lo_p, tl.full(lo_p.shape, LEVELS, tl.float32))
                # the zero from the unrounded scale, as IntFormat (and compressed-tensors)
                ratio = tl.where(raw > 0.0, tl.div_rn(lo_p, tl.where(raw > 0.0, raw, 1.0)), 0.0)
                z = tl.minimum(tl.maximum(_rint(QMIN - ratio), QMIN), QMAX)
            else:
                amax = tl.maximum(tl.abs(lo_p), tl.abs(hi_p))
                raw = tl.div_rn(amax, tl.full(lo_p.shape, LEVELS / 2, tl.float32))
            s = _round_scale(raw, SCALE_ROUND, FMAX, EPS)
        else:
            e = _mx_exponent(tl.maximum(tl.abs(lo_p), tl.abs(hi_p)), EMAX, CEIL, VMAX)
            code = e + 127
            s = _pow2(e)
        return s, z, code

    @triton.jit
    def _mx_exponent(amax, EMAX: tl.constexpr, CEIL: tl.constexpr, VMAX: tl.constexpr):
        """MXFormat.shared_exponent: the E8M0 exponent (int32) of a block from amax >= 0's exponent bits."""
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - EMAX
        if CEIL:
            e = e + (amax * _pow2(tl.minimum(-e, 127)) > VMAX).to(tl.int32)
        return tl.minimum(tl.maximum(e, -127), 127)

    @triton.jit
    def _params_kernel(LO, HI, S, Z, CODE, n,
                       FAMILY: tl.constexpr, HAS_ZERO: tl.constexpr, LEVELS: tl.constexpr,
                       SCALE_ROUND: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr, EMAX: tl.constexpr,
                       CEIL: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, VMAX: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        s, z, code = _params(tl.load(LO + offs, mask=m, other=0.0), tl.load(HI + offs, mask=m, other=0.0),
                             FAMILY, HAS_ZERO, LEVELS, SCALE_ROUND, FMAX, EPS, EMAX, CEIL, QMIN, QMAX, VMAX)
        tl.store(S + offs, s, mask=m)
        tl.store(Z + offs, z, mask=m)
        tl.store(CODE + offs, code, mask=m)

    @triton.jit
    def _log2_approx(x):
        """lg2.approx.f32 (PTX): -inf at 0, so exp2(NORM * it) is 0 there without a select."""
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _group_error(q, w, cw, jmask, HAS_CW: tl.constexpr, NORM: tl.constexpr, GP: tl.constexpr,
                     GLEN: tl.constexpr, FAST_LOG2: tl.constexpr):
        """Σ over each row of the tile of cw · |q - w|^NORM (|d|^NORM = exp2(NORM·log2|d|), 0 at d = 0)."""
        d = tl.abs(q - w)
        if NORM == 2.0:
            err = d * d
        elif FAST_LOG2:
            err = tl.exp2(NORM * _log2_approx(d))
        else:
            err = tl.where(d == 0.0, 0.0, tl.exp2(NORM * tl.log2(tl.where(d == 0.0, 1.0, d))))
        if HAS_CW:
            err = err * cw
        if GP != GLEN:
            err = tl.where(jmask[None, :], err, 0.0)
        return tl.sum(err, axis=1)

    @triton.jit(do_not_specialize=["NG", "G", "R", "s_a", "s_b", "s_c"])
    def _search_kernel(W, P, CW, S, Z, CODE, IDX,
                       NG, G, R, s_a, s_b, s_c,
                       NCAND: tl.constexpr, GLEN: tl.constexpr, GP: tl.constexpr, BLOCK_G: tl.constexpr,
                       HAS_CW: tl.constexpr, NORM: tl.constexpr,
                       FAMILY: tl.constexpr, HAS_ZERO: tl.constexpr, LEVELS: tl.constexpr,
                       SCALE_ROUND: tl.constexpr, FMAX: tl.constexpr, EPS: tl.constexpr,
                       EMAX: tl.constexpr, CEIL: tl.constexpr,
                       KIND: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                       MBITS: tl.constexpr, EMIN_BIASED: tl.constexpr, VMAX: tl.constexpr,
                       NLEV: tl.constexpr, FAST_LOG2: tl.constexpr):
        """Groups program_id(0)*BLOCK_G ... of W (flat [NG, GLEN], padded to GP columns): the best
        candidate per group (IDX) and its params (S; Z for asymmetric ints; CODE = E8M0 code for MX).
        FAMILY 0: IntFormat, 1: MXFormat. CW: column weights, element (a, b, c) at a*s_a + b*s_b + c*s_c
        for flat row = a*R + b (the weight viewed as [A, R, C], C = G*GLEN).

        NLEV > 0 (MX only): a block's params are its E8M0 exponent alone, and over the candidates
        (amax·p, p falling, consecutive ratios < 2) the exponent takes every value from
        e(amax) down to e(amax·p_min), each on a run of consecutive candidates. So the NLEV >= that
        many exponents are rounded and scored once each, in falling order (the strict < keeps the
        first run, i.e. the widest range, as the candidate loop would), and the index is the first
        candidate of the winning run: the candidate loop's answer with ~NLEV instead of NCAND tile
        passes."""
        n = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)          # [BLOCK_G] groups
        j = tl.arange(0, GP)                                                          # [GP] element in group
        gmask = n < NG
        jmask = j < GLEN
        m2 = gmask[:, None] & jmask[None, :]
        w = tl.load(W + n[:, None] * GLEN + j[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_CW:
            row = n // G
            col = (n % G) * GLEN
            off = ((row // R) * s_a + (row % R) * s_b)[:, None] + (col[:, None] + j[None, :]) * s_c
            cw = tl.load(CW + off, mask=m2, other=0.0).to(tl.float32)
        else:
            cw = w                                         # unused
        lo = tl.minimum(tl.min(w, axis=1), 0.0)           # padding (0) changes neither: both include 0
        hi = tl.maximum(tl.max(w, axis=1), 0.0)
        best_err = tl.full((BLOCK_G,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_G,), tl.int32)
        best_s = tl.zeros((BLOCK_G,), tl.float32)
        best_z = tl.zeros((BLOCK_G,), tl.float32)
        best_c = tl.zeros((BLOCK_G,), tl.int32)
        if NLEV > 0:
            amax = tl.maximum(tl.abs(lo), tl.abs(hi))
            e_hi = _mx_exponent(amax, EMAX, CEIL, VMAX)                   # p_0 = 1
            e_lo = _mx_exponent(amax * tl.load(P + NCAND - 1), EMAX, CEIL, VMAX)
            for k in range(NLEV):
                e = e_hi - k
                s2 = tl.broadcast_to(_pow2(e)[:, None], (BLOCK_G, GP))
                q = _round(w, s2, s2, KIND, False, QMIN, QMAX, MBITS, EMIN_BIASED, VMAX)
                tot = _group_error(q, w, cw, jmask, HAS_CW, NORM, GP, GLEN, FAST_LOG2)
                better = ((tot < best_err) & (e >= e_lo)) | (k == 0)        # k = 0: p = 1, always valid
                best_err = tl.where(better, tot, best_err)
                best_c = tl.where(better, e + 127, best_c)
            best_s = _pow2(best_c - 127)
            best_i = tl.full((BLOCK_G,), NCAND, tl.int32)
            for i in range(NCAND):                                        # the first candidate of that run
                e_i = _mx_exponent(amax * tl.load(P + i), EMAX, CEIL, VMAX)
                best_i = tl.where((e_i + 127 == best_c) & (best_i == NCAND), i, best_i)
        if NLEV == 0:                                      # every candidate
            for i in range(NCAND):
                p = tl.load(P + i)
                lo_p = lo * p                                  # the clamped group's extremes, exactly
                hi_p = hi * p
                s, z, code = _params(lo_p, hi_p, FAMILY, HAS_ZERO, LEVELS, SCALE_ROUND, FMAX, EPS, EMAX, CEIL,
                                     QMIN, QMAX, VMAX)
                s2 = tl.broadcast_to(s[:, None], (BLOCK_G, GP))
                z2 = tl.broadcast_to(z[:, None], (BLOCK_G, GP))
                q = _round(w, s2, z2, KIND, HAS_ZERO, QMIN, QMAX, MBITS, EMIN_BIASED, VMAX)
                tot = _group_error(q, w, cw, jmask, HAS_CW, NORM, GP, GLEN, FAST_LOG2)
                # strictly: ties keep the wider range; candidate 0 (fmt.params) is taken even if its error is
                # inf or NaN, as the torch search starts from it
                better = (tot < best_err) | (i == 0)
                best_err = tl.where(better, tot, best_err)
                best_i = tl.where(better, i, best_i)
                best_s = tl.where(better, s, best_s)
                best_z = tl.where(better, z, best_z)
                best_c = tl.where(better, code, best_c)
        tl.store(S + n, best_s, mask=gmask)
        tl.store(IDX + n, best_i, mask=gmask)
        if HAS_ZERO:
            tl.store(Z + n, best_z, mask=gmask)
        if FAMILY == 1:
            tl.store(CODE + n, best_c, mask=gmask)


def _format_constants(fmt) -> dict:
    spec = fmt.elementwise_rounding()
    c = dict(KIND=KINDS[spec.kind], QMIN=float(spec.qmin), QMAX=float(spec.qmax), MBITS=spec.mbits,
             EMIN_BIASED=spec.emin + 127, VMAX=float(spec.max), LEVELS=1.0, SCALE_ROUND=0, FMAX=0.0, EPS=0.0,
             EMAX=0, CEIL=False)
    if type(fmt) is IntFormat:
        fi = torch.finfo(fmt.scale_dtype)
        c.update(FAMILY=0, HAS_ZERO=not fmt.sym, LEVELS=float(2 ** fmt.bits - 1),
                 SCALE_ROUND=SCALE_ROUNDING[fmt.scale_dtype], FMAX=float(fi.max), EPS=float(fi.eps))
    else:
        c.update(FAMILY=1, HAS_ZERO=False, EMAX=fmt.emax, CEIL=fmt.scale_mode == "ceil", VMAX=float(fmt.max))
    return c


def _mx_levels(grid: int, max_shrink: float) -> int:
    """Exponents an MX block can take over the candidates (see _search_kernel), or 0 (score every
    candidate) unless consecutive candidates are within a factor 2 (then the exponents form one run each).
    e(a) - e(a·p_min) <= ceil(log2(1/p_min)), one more in "ceil" mode; levels = that + 1."""
    ps = [1 - i / grid for i in range(max(1, int(max_shrink * grid)))]
    if ps[-1] <= 0 or any(b * 2 <= a for a, b in zip(ps, ps[1:])):
        return 0
    return min(len(ps), math.ceil(math.log2(1 / ps[-1])) + 2)


def search(fmt, w: torch.Tensor, col_weight: torch.Tensor | None = None, *, grid: int, max_shrink: float,
           norm: float, block_groups: int | None = None):
    """(QParams, idx): scale_search.search_params' result and the chosen candidate index i [..., G] int32
    (p = candidates(grid, max_shrink)[i]). Needs supports(fmt, w, col_weight). block_groups: groups per
    program (a power of two; default from TILE), for tests."""
    fmt.ensure_finite(w)                                  # as fmt.params in the torch search
    C = w.shape[-1]
    g = fmt.group_len(C)
    G = C // g
    lead = tuple(w.shape[:-1])
    NG = w.numel() // g
    wc = w.contiguous()
    dev = w.device
    P = candidates(grid, max_shrink, dev)
    GP = triton.next_power_of_2(g)
    if block_groups is None:
        block_groups = max(1, (INTERPRETER_TILE if INTERPRETED else TILE) // GP)
    R = w.shape[-2] if w.dim() >= 2 else 1
    if col_weight is not None:
        cw = col_weight.expand(w.shape).reshape(-1, R, C)  # a view for the usual [E, 1, C] / [C]
        s_a, s_b, s_c = cw.stride()
    else:
        cw, (s_a, s_b, s_c) = wc, (0, 0, 0)
    consts = _format_constants(fmt)
    consts["NLEV"] = _mx_levels(grid, max_shrink) if consts["FAMILY"] == 1 else 0
    consts["FAST_LOG2"] = FAST_LOG2 and not INTERPRETED and torch.version.hip is None    # inline PTX: NVIDIA only
    S = torch.empty(NG, dtype=torch.float32, device=dev)
    IDX = torch.empty(NG, dtype=torch.int32, device=dev)
    Z = torch.empty(NG, dtype=torch.float32, device=dev) if consts["HAS_ZERO"] else S
    CODE = torch.empty(NG, dtype=torch.int32, device=dev) if consts["FAMILY"] == 1 else IDX
    _search_kernel[(triton.cdiv(NG, block_groups),)](
        wc, P, cw, S, Z, CODE, IDX, NG, G, R, s_a, s_b, s_c,
        NCAND=P.numel(), GLEN=g, GP=GP, BLOCK_G=block_groups, HAS_CW=col_weight is not None, NORM=float(norm),
        **consts, num_warps=max(4, min(16, GP * block_groups // (32 * ELEMS_PER_THREAD))), enable_fp_fusion=False)
    shape = lead + (G,)
    if consts["FAMILY"] == 1:
        p = fmt.params_from_e8m0(CODE.to(torch.uint8).reshape(shape))
    else:
        p = QParams(S.reshape(shape), Z.reshape(shape) if consts["HAS_ZERO"] else None)
    return p, IDX.reshape(shape)


def params_of_extremes(fmt, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
    """The kernel's params of groups whose extremes are lo <= 0 <= hi (float32, same shape), as the
    search computes them per candidate: what the tests compare with fmt.params group by group."""
    lo, hi = lo.float().contiguous(), hi.float().contiguous()
    S, Z = torch.empty_like(lo), torch.empty_like(lo)
    CODE = torch.empty(lo.shape, dtype=torch.int32, device=lo.device)
    consts = _format_constants(fmt)
    keep = ("FAMILY", "HAS_ZERO", "LEVELS", "SCALE_ROUND", "FMAX", "EPS", "EMAX", "CEIL", "QMIN", "QMAX", "VMAX")
    n, BLOCK = lo.numel(), 1024
    _params_kernel[(triton.cdiv(n, BLOCK),)](lo, hi, S, Z, CODE, n, **{k: consts[k] for k in keep}, BLOCK=BLOCK,
                                            enable_fp_fusion=False)
    if consts["FAMILY"] == 1:
        return fmt.params_from_e8m0(CODE.to(torch.uint8))
    return QParams(S, Z if consts["HAS_ZERO"] else None)


def search_params(fmt, w: torch.Tensor, col_weight: torch.Tensor | None = None, *, grid: int,
                  max_shrink: float, norm: float) -> QParams:
    """scale_search.search_params on the kernel (see the module docstring for what is exact)."""
    return search(fmt, w, col_weight, grid=grid, max_shrink=max_shrink, norm=norm)[0]
