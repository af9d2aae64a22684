"""Benchmark of the expert-batched GPTQ solver on OLMoE-1B-7B layer shapes.

One decoder layer of OLMoE-1B-7B has 64 experts, each with gate_proj and up_proj
[1024, 2048] and down_proj [2048, 1024]. gate and up read the same input, so they share
one Hessian and are solved in ONE call with their rows stacked (W [64, 2048, 2048]);
down is a second call (W [64, 2048, 1024]). Per format this reports, in one run:
  - batched time (both calls) vs a loop of per-expert 2D solves, and whether they agree;
  - the default solve (on a GPU: the fused Triton sweep, one kernel per lazy block) against
    the torch sweep replayed from CUDA graphs (`fused=False`), and whether they agree;
  - the batched solve without CUDA graphs (eager), and the Hessian-inverse phase alone;
  - relative output error ||(W - Q) Xᵀ|| / ||W Xᵀ|| of GPTQ vs round-to-nearest.
Hessians come from random correlated activations X = (Z @ A_e) · s (T tokens per expert,
per-channel log-normal scales s for outlier channels).

    PYTHONPATH=. python bench/solver.py --out bench/results/solver.json
    PYTHONPATH=. python bench/solver.py --quick --device cpu       # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from alphaquant.formats import get_format
from alphaquant.gptq import gptq_quantize
from alphaquant.gptq import fused_sweep, sweep
from alphaquant.gptq.linalg import damped_inverse_factor

FORMATS = {"int4": dict(name="int4", group_size=128), "mxfp4": dict(name="mxfp4", group_size=32),
           "nvfp4": dict(name="nvfp4", group_size=16), "int3": dict(name="int3", group_size=128)}
LABEL = {"int4": "int4 g128", "mxfp4": "mxfp4 g32", "nvfp4": "nvfp4 g16", "int3": "int3 g128"}


def random_hessians(E, C, T, device, gen):
    """H [E, C, C] = 2/T XᵀX of correlated, unevenly scaled activations X [E, T, C]."""
    s = torch.exp(torch.randn(C, generator=gen, device=device))             # outlier channels
    H = torch.empty(E, C, C, device=device)
    for e in range(E):                                                     # one expert at a time: memory
        A = torch.randn(C, C, generator=gen, device=device) / C ** 0.5 + torch.eye(C, device=device)
        X = (torch.randn(T, C, generator=gen, device=device) @ A) * s
        H[e] = 2 * X.T @ X / T
    return H


def layer(E, I, D, T, device, seed=0):
    """The two solver calls of one OLMoE layer: (name, W [E, R, C], H [E, C, C])."""
    gen = torch.Generator(device=device).manual_seed(seed)
    W_gate_up = torch.randn(E, 2 * I, D, generator=gen, device=device) * 0.02   # gate ⊕ up rows
    W_down = torch.randn(E, D, I, generator=gen, device=device) * 0.02
    return [("gate_up", W_gate_up, random_hessians(E, D, T, device, gen)),
            ("down", W_down, random_hessians(E, I, T, device, gen))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    """(median seconds, last result) of fn() over `repeat` runs, synchronised."""
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_output_error(W, Q, H):
    """||(W - Q) Xᵀ|| / ||W Xᵀ|| over a whole call, through H ∝ XᵀX."""
    quad = lambda M: ((M @ H) * M).sum()                                    # noqa: E731
    return float((quad(W - Q) / quad(W)).sqrt())


def bench_format(key, mats, device, loop_experts, repeat):
    fmt = get_format(FORMATS[key]["name"], group_size=FORMATS[key]["group_size"])
    solve_all = lambda **kw: [gptq_quantize(W, H, fmt, **kw) for _, W, H in mats]   # noqa: E731
    t_first, _ = timed(solve_all, device)                    # warm-up: includes capturing the CUDA graphs
    t_batched, res = timed(solve_all, device, repeat)        # steady state: graphs cached per shape
    fused = fused_sweep.supports(fmt, device, 128)
    if fused:                                                # the torch sweep (CUDA graphs) beside it
        solve_all(fused=False)
        t_graph, res_graph = timed(lambda: solve_all(fused=False), device, repeat)
    else:
        t_graph, res_graph = t_batched, res
    t_eager, _ = (timed(lambda: solve_all(cuda_graph=False, fused=False), device)
                  if device.type == "cuda" else (t_batched, None))
    t_prep, _ = timed(lambda: [damped_inverse_factor(H, 0.01, 1.0) for _, _, H in mats], device)
    n = loop_experts
    gptq_quantize(mats[0][1][0], mats[0][2][0], fmt)                       # warm-up 2D path
    t_loop, loop = timed(lambda: [[gptq_quantize(W[e], H[e], fmt) for e in range(n)] for _, W, H in mats], device)
    t_loop_all = t_loop * mats[0][1].shape[0] / n
    diff = [(r.weight[:n] - torch.stack([s.weight for s in l])).abs() for r, l in zip(res, loop)]
    row = {
        "format": LABEL[key], "fused": fused, "batched_s": t_batched, "batched_first_call_s": t_first,
        "graph_s": t_graph, "fused_speedup_vs_graph": t_graph / t_batched,
        "codes_diff_vs_graph": sum(float((r.qtensor.codes != q.qtensor.codes).float().sum()) for r, q in zip(res, res_graph))
        / sum(r.qtensor.codes.numel() for r in res),
        "loss_max_rel_diff_vs_graph": max(float(((r.loss - q.loss).abs() / q.loss.clamp_min(1e-30)).max())
                                          for r, q in zip(res, res_graph)),
        "batched_eager_s": t_eager, "hinv_prep_s": t_prep,
        "loop_2d_s": t_loop_all, "loop_experts_timed": n, "speedup": t_loop_all / t_batched,
        "max_abs_diff_vs_loop": max(float(d.max()) for d in diff),
        "frac_diff_vs_loop": sum(float((d > 0).float().sum()) for d in diff) / sum(d.numel() for d in diff),
        "rel_err_gptq": {name: rel_output_error(W, r.weight, H) for (name, W, H), r in zip(mats, res)},
        "rel_err_rtn": {name: rel_output_error(W, fmt.fake_quantize(W), H) for name, W, H in mats},
        "loss_max_rel_diff_vs_loop": max(float(((r.loss[:n] - torch.cat([s.loss for s in l])).abs()
                                                / torch.cat([s.loss for s in l])).max()) for r, l in zip(res, loop)),
        "fallbacks": sum(f is not None for r in res for f in r.fallback),
    }
    return row


def hinv_batched_vs_loop(mats, k=4):
    """Max relative difference of the batched Hinv vs per-expert Hinv (first k experts).

    Tells whether batched-vs-loop differences start in the factorisation (cuSOLVER
    picks other kernels for a batch) or in the sweep's matmuls.
    """
    H = mats[0][2][:k]
    batched = damped_inverse_factor(H, 0.01, 1.0)[0]
    single = torch.cat([damped_inverse_factor(H[e:e + 1], 0.01, 1.0)[0] for e in range(k)])
    return float((batched - single).abs().max() / single.abs().max())


def sub_block_scan(key, mats, device, sizes=(8, 16, 32, 128)):
    """Batched time per SUB_BLOCK (128 = one level of lazy batching, as the paper)."""
    fmt = get_format(FORMATS[key]["name"], group_size=FORMATS[key]["group_size"])
    default, out = sweep.SUB_BLOCK, {}
    try:
        for size in sizes:
            sweep.SUB_BLOCK = size
            [gptq_quantize(W, H, fmt) for _, W, H in mats]
            out[size] = timed(lambda: [gptq_quantize(W, H, fmt) for _, W, H in mats], device, 2)[0]
    finally:
        sweep.SUB_BLOCK = default
    return out


def print_table(rows, meta):
    print(f"\n{meta['device_name']} | E={meta['experts']} | gate_up W{meta['shapes']['gate_up']} "
          f"down W{meta['shapes']['down']} | T={meta['tokens']}")
    hdr = ("format", "fused", "batched s", "graphs s", "fused x", "codes diff", "1st call s", "eager s", "Hinv s",
           "loop2D s", "speedup", "diff frac", "loss diff", "err gptq gu/dn", "err rtn gu/dn")
    print(" | ".join(hdr))
    for r in rows:
        g, n = r["rel_err_gptq"], r["rel_err_rtn"]
        print(f"{r['format']} | {r['fused']} | {r['batched_s']:.3f} | {r['graph_s']:.3f} | {r['fused_speedup_vs_graph']:.1f}x | "
              f"{r['codes_diff_vs_graph']:.1e} | {r['batched_first_call_s']:.3f} | {r['batched_eager_s']:.3f} | {r['hinv_prep_s']:.3f} | "
              f"{r['loop_2d_s']:.2f} | {r['speedup']:.1f}x | {r['frac_diff_vs_loop']:.1e} | "
              f"{r['loss_max_rel_diff_vs_loop']:.1e} | "
              f"{g['gate_up']:.4f}/{g['down']:.4f} | {n['gate_up']:.4f}/{n['down']:.4f}")


def profile(key, mats, device, out_dir):
    """Kernel time per op of one eager batched solve (graphs hide kernels from the profiler)."""
    fmt = get_format(FORMATS[key]["name"], group_size=FORMATS[key]["group_size"])
    _, W, H = mats[0]
    gptq_quantize(W, H, fmt, cuda_graph=False)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        gptq_quantize(W, H, fmt, cuda_graph=False)
        sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    print(table)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"profile_{key}.txt").write_text(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--formats", default="int4,mxfp4", help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--loop-experts", type=int, default=None, help="experts in the timed 2D loop (default all)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", default="bench/results/solver.json")
    ap.add_argument("--profile", action="store_true", help="only profile one eager gate_up solve per format")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    E, I, D, T = (4, 128, 256, 512) if a.quick else (a.experts, 1024, 2048, a.tokens)
    mats = layer(E, I, D, T, device)
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "experts": E, "tokens": T,
            "shapes": {n: list(W.shape) for n, W, _ in mats}}
    if a.profile:
        for key in a.formats.split(","):
            profile(key, mats, device, Path(a.out).parent)
        return
    rows = []
    for key in a.formats.split(","):
        rows.append(bench_format(key, mats, device, min(a.loop_experts or E, E), a.repeat))
        print(json.dumps(rows[-1]), flush=True)
    meta["hinv_rel_diff_batched_vs_loop"] = hinv_batched_vs_loop(mats)
    meta["sub_block_scan_s"] = {LABEL[k]: sub_block_scan(k, mats, device) for k in a.formats.split(",")[:2]}
    print(json.dumps({k: meta[k] for k in ("hinv_rel_diff_batched_vs_loop", "sub_block_scan_s")}))
    print_table(rows, meta)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
