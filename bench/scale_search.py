"""Benchmark of the MSE scale search: the torch loop vs the fused Triton kernel (gptq/fused_scale_search.py).

One OLMoE-1B-7B layer: 64 experts, gate ⊕ up W [64, 2048, 2048] and down W [64, 2048, 1024] (~400M weights),
random N(0, 0.02) weights with 1% outliers x6. Per format and mode (mse, mse_hdiag with a random column
weight [64, 1, C]) it reports the layer's search time both ways (median of --reps after a warm-up; the
torch loop once, it takes ~1 s), the share of groups whose scale (and zero) agree, and, for int4 g128,
the kernel's time per (TILE, ELEMS_PER_THREAD) so the defaults can be tuned -- all with the precise software log2 --
and with FAST_LOG2 (the hardware log2, the default) for int4 g128 sym/asym and mxfp4.

    PYTHONPATH=. python bench/scale_search.py --out bench/results/scale_search.json
    PYTHONPATH=. python bench/scale_search.py --quick          # 8 experts, seconds

Needs a CUDA device (the kernel runs only there outside Triton's interpreter); on a CPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from alphaquant.formats import get_format
from alphaquant.gptq import fused_scale_search
from alphaquant.gptq.scale_search import search_params

FORMATS = {"int4 g128": dict(name="int4", group_size=128), "int4 g128 asym": dict(name="int4", group_size=128, sym=False),
           "int3 g64 bf16": dict(name="int3", group_size=64, scale_dtype=torch.bfloat16), "mxfp4 g32": dict(name="mxfp4")}
TUNING = [(512, 4), (1024, 4), (1024, 8), (2048, 8), (2048, 16)]


def timed(fn, reps):
    torch.cuda.synchronize()
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def agree(a, b):
    same = a.scale == b.scale
    if a.zero is not None:
        same &= a.zero == b.zero
    return same.float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="8 experts instead of 64")
    args = ap.parse_args()
    if not torch.cuda.is_available() or fused_scale_search.triton is None:
        print("bench/scale_search.py needs a CUDA device and Triton; nothing to measure here")
        return 0
    dev = torch.device("cuda")
    E = 8 if args.quick else 64
    gen = torch.Generator(device=dev).manual_seed(0)
    mats = {}
    for name, (R, C) in {"gate_up": (2048, 2048), "down": (2048, 1024)}.items():
        w = torch.randn(E, R, C, generator=gen, device=dev) * 0.02
        w[torch.rand(E, R, C, generator=gen, device=dev) < 0.01] *= 6
        mats[name] = (w, torch.rand(E, 1, C, generator=gen, device=dev) + 0.1)
    rows = []
    fast_default = fused_scale_search.FAST_LOG2
    fused_scale_search.FAST_LOG2 = False        # the table and the tuning with the precise log2; the fast rows after
    for label, opts in FORMATS.items():
        fmt = get_format(**opts)
        for mode in ("mse", "mse_hdiag"):
            row = {"format": label, "mode": mode, "experts": E, "torch_s": 0.0, "fused_s": 0.0, "agree": 1.0}
            for w, cw in mats.values():
                cw = cw if mode == "mse_hdiag" else None
                assert fused_scale_search.supports(fmt, w, cw)
                ref, t_ref = timed(lambda: search_params(fmt, w, cw, fused=False), 1)
                search_params(fmt, w, cw, fused=True)                      # compile
                got, t_got = timed(lambda: search_params(fmt, w, cw, fused=True), args.reps)
                row["torch_s"] += t_ref
                row["fused_s"] += t_got
                row["agree"] = min(row["agree"], agree(got, ref))
                del ref, got
            row["speedup"] = row["torch_s"] / row["fused_s"]
            rows.append(row)
            print(f"{label:15s} {mode:9s} torch {row['torch_s'] * 1e3:8.1f} ms  fused {row['fused_s'] * 1e3:7.2f} ms  "
                  f"x{row['speedup']:6.1f}  same params {row['agree']:.4%}", flush=True)
    tuning = []
    fmt = get_format(**FORMATS["int4 g128"])
    defaults = fused_scale_search.TILE, fused_scale_search.ELEMS_PER_THREAD
    try:
        for tile, per_thread in TUNING:
            fused_scale_search.TILE, fused_scale_search.ELEMS_PER_THREAD = tile, per_thread
            total = 0.0
            for w, _ in mats.values():
                search_params(fmt, w, fused=True)
                total += timed(lambda: search_params(fmt, w, fused=True), args.reps)[1]
            tuning.append({"tile": tile, "elems_per_thread": per_thread, "fused_s": total})
            print(f"int4 g128 mse  TILE {tile:5d}  ELEMS_PER_THREAD {per_thread:2d}: {total * 1e3:7.2f} ms", flush=True)
        fused_scale_search.TILE, fused_scale_search.ELEMS_PER_THREAD = defaults
        fused_scale_search.FAST_LOG2 = True                                # the hardware log2 (the default)
        for label in ("int4 g128", "int4 g128 asym", "mxfp4 g32"):
            fmt = get_format(**FORMATS[label])
            total, same = 0.0, 1.0
            for w, _ in mats.values():
                search_params(fmt, w, fused=True)
                got, t = timed(lambda: search_params(fmt, w, fused=True), args.reps)
                total += t
                same = min(same, agree(got, search_params(fmt, w, fused=False)))
            tuning.append({"format": label, "fast_log2": True, "fused_s": total, "agree": same})
            print(f"{label:15s} mse  FAST_LOG2: {total * 1e3:7.2f} ms  same params {same:.4%}", flush=True)
    finally:
        fused_scale_search.TILE, fused_scale_search.ELEMS_PER_THREAD = defaults
        fused_scale_search.FAST_LOG2 = fast_default
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": fused_scale_search.triton.__version__, "defaults": {"tile": defaults[0],
              "elems_per_thread": defaults[1]}, "layer": rows, "tuning": tuning}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
