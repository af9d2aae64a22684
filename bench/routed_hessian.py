"""Benchmark of the routed experts' weighted Hessians: H[e] += Σ c x xᵀ over each expert's rows, one MoE layer.

OLMoE-1B-7B shapes: 64 experts, ~16k rows per expert per batch (64 x 2048 tokens, top-8), C = 2048 (gate/up
inputs) and 1024 (down inputs), bf16 rows, float32 routing weights. Variants, all from the same sorted rows:

  current      gptq/hessian.py's `accumulate_segments` (the baseline: split in runs of experts, then per expert
               two torch.addmm(H[e], ·ᵀ, x, out_dtype=float32, out=H[e]): no temporaries, no add kernels)
  mm_add       what it did before: per expert p = hiᵀx, q = loᵀx (float32 temporaries), H += p; H += q
  stacked      per expert one float32-output product of [hi; lo]ᵀ with [x; x] (K doubled; x copied once per run)
  upper2/4     `mm_add` on the upper triangle of a 2 x 2 (4 x 4) block grid only (3/4, 10/16 of the products);
               the lower blocks mirrored once at the end (H is symmetric)
  hi_only      one product hiᵀx: c·x rounded to bf16 (~2^-9 relative per element), for its error only

Per variant: the median wall time of --reps calls (host launch time included: the loop issues ~10^3 launches a
layer), the GPU time by CUDA events, the ratio to `current`, and the largest relative error |H - H64| / max|H64|
against a float64 reference on two experts.

    PYTHONPATH=. python bench/routed_hessian.py --out bench/results/routed_hessian.json
    PYTHONPATH=. python bench/routed_hessian.py --quick        # 8 experts

Needs a CUDA device; on a CPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from alphaquant.gptq.hessian import HessianState, accumulate_segments
from alphaquant.gptq.weighted_split import split_weighted

F32 = torch.float32


def runs(counts, cols):
    """(first expert, end expert, first row, rows) of each split run, as the current code groups them."""
    from alphaquant.gptq.hessian import SPLIT_CHUNK_ELEMS
    budget = max(1, SPLIT_CHUNK_ELEMS // cols)
    e, start, out = 0, 0, []
    while e < len(counts):
        j, rows = e, 0
        while j < len(counts) and (j == e or rows + counts[j] <= budget):
            rows += counts[j]
            j += 1
        out.append((e, j, start, rows))
        start, e = start + rows, j
    return out


def each_expert(H, x, counts, w, body):
    for e0, e1, start, rows in runs(counts, x.shape[1]):
        hi, lo = split_weighted(x[start:start + rows], w[start:start + rows])
        off = 0
        for k in range(e0, e1):
            n = counts[k]
            if n:
                body(H[k], hi[off:off + n], lo[off:off + n], x[start + off:start + off + n])
            off += n


def v_current(H, x, counts, w, experts):
    accumulate_segments(H, x, counts, w, experts)


def v_mm_add(H, x, counts, w, experts):
    def body(h, hi, lo, xe):
        p, q = torch.mm(hi.T, xe, out_dtype=F32), torch.mm(lo.T, xe, out_dtype=F32)
        h.add_(p).add_(q)
    each_expert(H.H, x, counts, w, body)


def v_stacked(H, x, counts, w, experts):
    for e0, e1, start, rows in runs(counts, x.shape[1]):
        hi, lo = split_weighted(x[start:start + rows], w[start:start + rows])
        xs = x[start:start + rows]
        off = 0
        for k in range(e0, e1):
            n = counts[k]
            if n:
                a = torch.cat([hi[off:off + n], lo[off:off + n]])
                b = torch.cat([xs[off:off + n], xs[off:off + n]])
                torch.addmm(H.H[k], a.T, b, out_dtype=F32, out=H.H[k])
            off += n


def upper(blocks):
    def run(H, x, counts, w, experts):
        C = x.shape[1]
        s = C // blocks

        def body(h, hi, lo, xe):
            for i in range(blocks):
                for j in range(i, blocks):
                    t = h[i * s:(i + 1) * s, j * s:(j + 1) * s]
                    for part in (hi, lo):
                        t.add_(torch.mm(part[:, i * s:(i + 1) * s].T, xe[:, j * s:(j + 1) * s], out_dtype=F32))
        each_expert(H.H, x, counts, w, body)
        for i in range(blocks):                     # mirror once (at finalize in a real accumulator)
            for j in range(i + 1, blocks):
                H.H[:, j * s:(j + 1) * s, i * s:(i + 1) * s] = H.H[:, i * s:(i + 1) * s, j * s:(j + 1) * s].transpose(1, 2)
    return run


def v_hi_only(H, x, counts, w, experts):
    def body(h, hi, lo, xe):
        torch.addmm(h, hi.T, xe, out_dtype=F32, out=h)
    each_expert(H.H, x, counts, w, body)


VARIANTS = {"current": v_current, "mm_add": v_mm_add, "stacked": v_stacked, "upper2": upper(2), "upper4": upper(4),
            "hi_only": v_hi_only}


def problem(E, rows, C, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    counts = (rows * (0.7 + 0.6 * torch.rand(E, generator=g, device="cuda"))).long().tolist()
    N = sum(counts)
    x = torch.randn(N, C, generator=g, device="cuda").to(torch.bfloat16)
    w = torch.rand(N, generator=g, device="cuda").clamp_min(1e-3)
    experts = torch.repeat_interleave(torch.arange(E, device="cuda"), torch.tensor(counts, device="cuda"))
    return x, counts, w, experts


def reference(x, counts, w, e):
    start = sum(counts[:e])
    xe = x[start:start + counts[e]].double()
    return (xe * w[start:start + counts[e]].double()[:, None]).T @ xe


def measure(fn, x, counts, w, experts, reps):
    E, C = len(counts), x.shape[1]
    walls, gpus, state = [], [], None
    for r in range(reps + 1):                       # the first call warms up (kernel choice, allocator)
        state = HessianState.zeros(C, experts=E, device="cuda")
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        a.record()
        fn(state, x, counts, w, experts)
        b.record()
        torch.cuda.synchronize()
        if r:
            walls.append(time.perf_counter() - t)
            gpus.append(a.elapsed_time(b) / 1e3)
    return state, statistics.median(walls), statistics.median(gpus)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16384, help="rows per expert per batch (mean)")
    ap.add_argument("--quick", action="store_true", help="8 experts instead of 64")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/routed_hessian.py needs a CUDA device; nothing to measure here")
        return 0
    E = 8 if args.quick else 64
    rows_out = []
    for C in (2048, 1024):
        x, counts, w, experts = problem(E, args.rows, C)
        refs = {e: reference(x, counts, w, e) for e in (0, 1)}
        base = None
        for name, fn in VARIANTS.items():
            try:
                state, wall, gpu = measure(fn, x, counts, w, experts, args.reps)
            except (RuntimeError, TypeError, NotImplementedError) as err:
                rows_out.append({"cols": C, "variant": name, "error": f"{type(err).__name__}: {err}"[:200]})
                continue
            err = max(((state.H[e].double() - r).abs().max() / r.abs().max()).item() for e, r in refs.items())
            if name == "current":
                base = wall
            rows_out.append({"cols": C, "variant": name, "wall_s": wall, "gpu_s": gpu,
                             "ratio_to_current": wall / base if base else None, "max_rel_error": err})
            del state
        del x, w, experts
        torch.cuda.empty_cache()
    print(f"routed Hessians of one layer's experts: {E} experts x ~{args.rows} rows, {torch.cuda.get_device_name()}")
    print(f"{'C':>5} {'variant':<9} {'wall ms':>8} {'GPU ms':>8} {'x current':>9} {'max rel err':>12}")
    for r in rows_out:
        if "error" in r:
            print(f"{r['cols']:>5} {r['variant']:<9} failed: {r['error']}")
        else:
            print(f"{r['cols']:>5} {r['variant']:<9} {r['wall_s'] * 1e3:8.1f} {r['gpu_s'] * 1e3:8.1f} "
                  f"{r['ratio_to_current']:9.2f} {r['max_rel_error']:12.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "experts": E, "rows_per_expert": args.rows, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
