"""The GPTQ column sweep with each lazy block as ONE Triton kernel (CUDA, static groups).

`sweep.gptq_sweep` runs the in-block column loop as a handful of batched torch kernels per
column: 2048 columns are ~15,000 launches, replayed from CUDA graphs but still bound by
launch latency (about 50 us per column for any number of experts). That latency does not
shrink when experts are spread over more GPUs, so it was the serial part of a DDP layer.

Here one program owns RT rows of one expert for a whole block: it keeps the block's
[B, RT] weights in registers, and for each column i in order
    w   = tile[i]                                   (the column after all earlier updates)
    q   = round(w / s) ... * s                      (the format's rounding, static params)
    err = (w - q) / Hinv[i, i]                      (stored for the lazy update)
    tile[k] -= Hinv[i, k] / Hinv[i, i] * (w - q)    for k > i   (the OBS update)
so a block is one launch, and the work grows with experts x rows instead of with launches.
The lazy update of the later blocks stays a torch batched matmul (float32).

Same maths as `sweep.quantize_block`; the in-block updates are applied column by column
(the torch path groups them into sub-block matmuls), so results agree up to float32
rounding of the updates. The rounding itself is the format's own, bit for bit: each format
describes it with `Format.elementwise_rounding()` (a RoundingSpec) and `_round` below
follows the same operations in the same order (tests compare against `round_with`).

Triton is optional: `available()` is False without it (CPU installs), and the solver then
uses the torch sweep.
"""
from __future__ import annotations

import os

import torch

from alphaquant.formats.base import QParams, RoundingSpec

try:                                    # optional: a CUDA build of torch brings it
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU-only installs
    triton = None

ROWS_PER_PROGRAM = 32
"""Rows of one expert per program: the [B, 32] fp32 tile is 32 registers a thread at B = 128."""
MAX_BLOCK = 256
"""Largest lazy block the kernel holds in registers; larger block_size uses the torch sweep."""
KINDS = {"int": 0, "grid": 1, "int64ths": 2}


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter (a debugging mode, set before import): kernels run on CPU tensors.
The tests use it so that the kernel is checked on machines without a GPU."""


def available() -> bool:
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def supports(fmt, device: torch.device, blocksize: int) -> bool:
    """Whether the fused sweep can run this format on this device with this lazy block size."""
    kind = "cpu" if INTERPRETED else "cuda"
    return (available() and torch.device(device).type == kind and blocksize <= MAX_BLOCK
            and fmt.elementwise_rounding() is not None)


if triton is not None:
    @triton.jit
    def _rint(x):
        """Round half to even, as torch.round, in plain float32 arithmetic: adding 2^23 leaves no
        fraction bits, so the add itself rounds |x| < 2^23 to the nearest even integer (larger
        floats are integers already). No libdevice call, so Triton's CPU interpreter runs it too."""
        a = tl.abs(x)
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        return _copysign(r, x)

    @triton.jit
    def _copysign(mag, x):
        """mag (>= 0 or NaN) with the sign bit of x, by bits (keeps -0.0 as torch.copysign does)."""
        bits = (mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (x.to(tl.int32, bitcast=True) & -2147483648)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _round(w, s, z, KIND: tl.constexpr, HAS_ZERO: tl.constexpr, QMIN: tl.constexpr,
               QMAX: tl.constexpr, MBITS: tl.constexpr, EMIN_BIASED: tl.constexpr, VMAX: tl.constexpr):
        """w rounded to the format's grid with scale s (and zero z), as the formats' round_with."""
        x = tl.div_rn(w, s)                                         # a true division, as torch's w / s
        if KIND == 0:                                               # IntFormat
            if HAS_ZERO:
                x = x + z                                           # zero before rounding, as IntFormat
            c = _rint(x)                                            # half to even, as torch.round
            c = tl.minimum(tl.maximum(c, QMIN), QMAX)
            if HAS_ZERO:
                c = c - z
            q = c * s
        elif KIND == 1:                                             # element grid (floatgrid.round_to_elem)
            a = tl.minimum(tl.abs(x), VMAX)
            kb = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, EMIN_BIASED)
            inv_quantum = ((254 + MBITS - kb) << 23).to(tl.float32, bitcast=True)
            quantum = ((kb - MBITS) << 23).to(tl.float32, bitcast=True)
            q = _copysign(_rint(a * inv_quantum) * quantum, x) * s
        else:                                                       # MXINT8: k / 64, |k| <= 127
            c = tl.minimum(tl.maximum(_rint(x * 64.0), -127.0), 127.0)
            q = (c * 0.015625) * s                                  # / 64, exact
        return q

    # sizes and offsets are not specialised on (Triton would compile a variant per divisibility
    # of each, e.g. for a partial last block): one compile per format kind and block size
    @triton.jit(do_not_specialize=["C", "R", "G", "i1", "nb"])
    def _block_kernel(Wt, Hinv, S, Z, CG, Qt, Err,
                      C, R, G, i1, nb,
                      KIND: tl.constexpr, HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      MBITS: tl.constexpr, EMIN_BIASED: tl.constexpr, VMAX: tl.constexpr,
                      BP: tl.constexpr, RT: tl.constexpr):
        """Columns i1 .. i1+nb-1 of expert program_id(1), rows program_id(0)*RT ... (see module doc).

        Wt, Qt: [E, C, R]; Hinv: [E, C, C]; S, Z: [E, R, G] static params; CG: [E, C] int64
        group of each column in processing order; Err: [E, BP, R] (rows >= nb unused)."""
        e = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * RT + tl.arange(0, RT)
        rmask = rows < R
        cols = tl.arange(0, BP)
        cmask = cols < nb
        w_base = Wt + e * C * R + i1 * R
        tile = tl.load(w_base + cols[:, None] * R + rows[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        h_base = Hinv + e * C * C + i1 * C + i1
        p_base = e * R * G + rows * G
        for i in range(nb):
            w = tl.sum(tl.where(cols[:, None] == i, tile, 0.0), axis=0)        # [RT] column i, updated
            g = tl.load(CG + e * C + i1 + i)
            s = tl.load(S + p_base + g, mask=rmask, other=1.0)
            z = 0.0
            if HAS_ZERO:
                z = tl.load(Z + p_base + g, mask=rmask, other=0.0)
            q = _round(w, s, z, KIND, HAS_ZERO, QMIN, QMAX, MBITS, EMIN_BIASED, VMAX)
            tl.store(Qt + e * C * R + (i1 + i) * R + rows, q, mask=rmask)
            delta = w - q
            d = tl.load(h_base + i * C + i)
            tl.store(Err + e * BP * R + i * R + rows, tl.div_rn(delta, d), mask=rmask)
            h = tl.div_rn(tl.load(h_base + i * C + cols, mask=cmask & (cols > i), other=0.0), d)   # [BP]
            tile = tile - h[:, None] * delta[None, :]

    @triton.jit
    def _round_kernel(X, S, Z, Out, n,
                      KIND: tl.constexpr, HAS_ZERO: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      MBITS: tl.constexpr, EMIN_BIASED: tl.constexpr, VMAX: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        z = 0.0
        if HAS_ZERO:
            z = tl.load(Z + offs, mask=m, other=0.0)
        q = _round(tl.load(X + offs, mask=m, other=0.0), tl.load(S + offs, mask=m, other=1.0), z,
                   KIND, HAS_ZERO, QMIN, QMAX, MBITS, EMIN_BIASED, VMAX)
        tl.store(Out + offs, q, mask=m)


def _constants(spec: RoundingSpec, has_zero: bool) -> dict:
    return dict(KIND=KINDS[spec.kind], HAS_ZERO=has_zero, QMIN=float(spec.qmin), QMAX=float(spec.qmax),
                MBITS=spec.mbits, EMIN_BIASED=spec.emin + 127, VMAX=float(spec.max))


def round_elements(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: RoundingSpec):
    """The kernel's rounding on same-shaped float32 CUDA tensors (what the tests compare with round_with)."""
    x, scale = x.float().contiguous(), scale.float().contiguous()
    zero = None if zero is None else zero.float().contiguous()
    out = torch.empty_like(x)
    n, BLOCK = x.numel(), 1024
    _round_kernel[(triton.cdiv(n, BLOCK),)](x, scale, x if zero is None else zero, out, n,
                                            **_constants(spec, zero is not None), BLOCK=BLOCK)
    return out


def fused_gptq_sweep(Wt: torch.Tensor, Hinv: torch.Tensor, spec: RoundingSpec, p: QParams,
                     col_group: torch.Tensor, blocksize: int):
    """`sweep.gptq_sweep` for static params, one kernel per block; returns (Qt [E, C, R], loss [E]).

    Wt: [E, C, R] float32 working weights in processing order (overwritten by the lazy updates).
    Hinv: [E, C, C] upper Cholesky factor of the damped H⁻¹ (processing order).
    p: static params of the original W, scale/zero [E, R, G]; col_group: [E, C] group of each
    processed column. loss: Σ_j ||w_j - q_j||² / (2 Hinv[j, j]²), as gptq_sweep.
    """
    if Wt.dtype != torch.float32:
        raise ValueError(f"the fused sweep runs in float32, got {Wt.dtype}")
    E, C, R = Wt.shape
    Wt, Hinv = Wt.contiguous(), Hinv.contiguous()
    S = p.scale.float().contiguous()
    Z = None if p.zero is None else p.zero.float().contiguous()
    CG = col_group.to(torch.int64).contiguous()
    G = S.shape[-1]
    BP = triton.next_power_of_2(blocksize)
    Qt = torch.empty_like(Wt)
    Err = torch.empty(E, BP, R, dtype=Wt.dtype, device=Wt.device)
    err_sq = torch.zeros(E, dtype=Wt.dtype, device=Wt.device)
    grid = (triton.cdiv(R, ROWS_PER_PROGRAM), E)
    consts = _constants(spec, Z is not None)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        nb = i2 - i1
        _block_kernel[grid](Wt, Hinv, S, S if Z is None else Z, CG, Qt, Err, C, R, G, i1, nb,
                            **consts, BP=BP, RT=ROWS_PER_PROGRAM, num_warps=4)
        Err1 = Err[:, :nb]
        err_sq += Err1.square().sum((1, 2))
        if i2 < C:     # lazy batch update: all later columns at once, one batched matmul
            Wt[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1)
    return Qt, err_sq / 2
