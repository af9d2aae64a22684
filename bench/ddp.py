"""Two GPUs against one: the same OLMoE-shaped checkpoint and tokens through our pipeline with
`trainer.devices: 1` and with `trainer.devices: N, strategy: ddp` (Lightning DDP, NCCL).

    PYTHONPATH=. python bench/ddp.py --devices 2 --out bench/results/ddp.json
    PYTHONPATH=. python bench/ddp.py --quick --device cpu --devices 2     # gloo smoke run on CPU

Stages run through bench/e2e.py (a random checkpoint with the real shapes, then our stage once per
device count, each in its own process; the DDP run's other ranks are started by Lightning). Then:
  - wall time of each run end to end and per layer, ratio 1 GPU / N GPUs;
  - peak GPU memory of every rank;
  - the checkpoints compared tensor by tensor (identical tensors; for the others, how many packed
    words / elements differ), and per-module token counts and relative errors from each run's
    alphaquant_summary.json. DDP sums Hessians across ranks in another order than one process's
    running sum, so fp32 Hessians may differ in their last bits and move a few weights to the
    neighbouring grid point; token counts must be identical and errors equal to that precision.
NCCL runs with NVLink multicast off (NCCL_NVLS_ENABLE=0), as the GPU machines here require.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import e2e  # noqa: E402


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two checkpoints written by our pipeline."""
    from alphaquant.models import CheckpointReader
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    identical, differing, elems_diff, elems_total = 0, [], 0, 0
    for key in sorted(ra.key_to_file):
        if key not in rb.key_to_file:
            differing.append((key, "missing"))
            continue
        ta, tb = ra.read(key), rb.read(key)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            differing.append((key, f"shape/dtype {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}"))
            continue
        elems_total += ta.numel()
        if torch.equal(ta, tb):
            identical += 1
            continue
        n = int((ta != tb).sum())
        elems_diff += n
        differing.append((key, f"{n} of {ta.numel()} elements differ"))
    return {"tensors": len(ra.key_to_file), "identical": identical,
            "only_in_second": sorted(set(rb.key_to_file) - set(ra.key_to_file)),
            "differing": len(differing), "differing_examples": differing[:10],
            "elements_differing": elems_diff, "elements_total": elems_total}


def compare_summaries(a: Path, b: Path) -> dict:
    sa, sb = (json.loads((d / "alphaquant_summary.json").read_text()) for d in (a, b))
    ma, mb = sa["modules"], sb["modules"]
    tokens_equal = all(ma[n]["tokens"] == mb[n]["tokens"] for n in ma)
    rel = [abs(ma[n]["rel_error"] - mb[n]["rel_error"]) / max(ma[n]["rel_error"], 1e-12) for n in ma]
    layers = [{"layer": la["layer"], "one": la["mean_rel_error"], "many": lb["mean_rel_error"]}
              for la, lb in zip(sa["layers"], sb["layers"])]
    return {"modules": len(ma), "tokens_equal": tokens_equal,
            "rel_error_max_relative_difference": max(rel), "rel_error_mean_relative_difference": statistics.fmean(rel),
            "layers": layers}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--family", default="olmoe", choices=sorted(e2e.SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the real model's count)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward on each rank")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 8 windows of 128 tokens")
    p.add_argument("--reuse-build", action="store_true")
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "lightning"],
                   help="start all ranks at once with torchrun, or let Lightning start ranks 1.. from rank 0 "
                        "(they then load the model after rank 0 has)")
    p.add_argument("--sweep", default="auto", choices=["auto", "torch"], help="gptq.sweep of every run")
    p.add_argument("--workdir", default=None, help="scratch directory, kept (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary scratch directory")
    p.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    args = p.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ns = argparse.Namespace(family=args.family, layers=args.layers, samples=args.samples, seq_len=args.seq_len,
                            batch_size=args.batch_size, hessian="routed", act_order=1, device=args.device, seed=0,
                            quick=args.quick, profile=False, cprofile=False, devices=1, sweep=args.sweep)
    if args.quick and args.samples == 128:
        ns.samples, ns.seq_len, ns.batch_size = 8, 128, 2
    import shutil
    import tempfile
    work = Path(args.workdir or tempfile.mkdtemp(prefix="aq-ddp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:                          # three checkpoints of the model: removed unless named (--workdir) or --keep
        return _run_all(args, argv, ns, work)
    finally:
        if not (args.workdir or args.keep):
            shutil.rmtree(work, ignore_errors=True)
            print(f"[ddp] removed the scratch directory {work} (--keep or --workdir keeps it)", flush=True)


def _run_all(args, argv, ns, work: Path) -> dict:
    command = "PYTHONPATH=. python bench/ddp.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    build = (json.loads((work / "build.json").read_text()) if args.reuse_build and (work / "build.json").is_file()
             else e2e.run_stage(ns, "build", work))
    # control: one GPU with half the batch size. Other batches mean other expert batch shapes, so other
    # GEMM kernels and fp32 roundings, which near-tied routing decisions of later layers amplify: the
    # same kind of difference DDP's per-rank batches cause, with no distribution involved.
    control = e2e.run_stage(argparse.Namespace(**{**vars(ns), "batch_size": max(1, ns.batch_size // 2)}), "ours", work)
    (work / "ours_out").replace(work / "ours_out_control")
    one = e2e.run_stage(ns, "ours", work)
    launcher = [] if args.launcher == "lightning" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.devices}"]
    many = e2e.run_stage(argparse.Namespace(**{**vars(ns), "devices": args.devices}), "ours", work,
                         launcher=launcher)
    ckpt = compare_checkpoints(work / "ours_out", work / f"ours_out_{args.devices}gpu")
    summ = compare_summaries(work / "ours_out", work / f"ours_out_{args.devices}gpu")
    ctrl_ckpt = compare_checkpoints(work / "ours_out", work / "ours_out_control")
    ctrl_summ = compare_summaries(work / "ours_out", work / "ours_out_control")
    per_layer = lambda r: statistics.fmean(l["seconds"] for l in r["layers"][1:]) if len(r["layers"]) > 1 \
        else r["layers"][0]["seconds"]  # noqa: E731
    result = {
        "command": command, "model": e2e.NAMES[args.family], "devices": args.devices,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "samples": ns.samples, "seq_len": ns.seq_len, "batch_size_per_rank": ns.batch_size,
        "launcher": args.launcher, "build": build, "one": one, "many": many, "control": control,
        "checkpoint": ckpt, "summaries": summ, "control_checkpoint": ctrl_ckpt, "control_summaries": ctrl_summ,
        "summary": {"seconds_one": one["seconds_end_to_end"], "seconds_many": many["seconds_end_to_end"],
                    "ratio": one["seconds_end_to_end"] / many["seconds_end_to_end"],
                    "walk_one": one["stage_seconds"].get("walk"), "walk_many": many["stage_seconds"].get("walk"),
                    "per_layer_one": per_layer(one), "per_layer_many": per_layer(many),
                    "gpu_peak_gib_one": one["memory"].get("gpu_peak_gib"),
                    "gpu_peak_gib_per_rank": [m.get("gpu_peak_gib") for m in many["memory_per_rank"]]},
        "bench_seconds": time.perf_counter() - t0,
    }
    table = render(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        e2e.write_json(out, result)
        out.with_suffix(".md").write_text(table + "\n")
    return result


def render(r: dict) -> str:
    s, c, m, n = r["summary"], r["checkpoint"], r["summaries"], r["devices"]
    cc, cm = r["control_checkpoint"], r["control_summaries"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"### {r['model']} shapes ({r['build']['layers']} layers), {r['samples']}x{r['seq_len']} calibration "
             f"tokens, int4 g128: 1 vs {n} GPUs ({r['device']}, ranks started by {r['launcher']})", "",
             f"`{r['command']}`", "",
             f"| | 1 GPU | {n} GPUs (DDP) |", "|---|---|---|",
             f"| end to end (s) | {s['seconds_one']:.1f} | {s['seconds_many']:.1f} |",
             f"| walk over the layers (s) | {fmt(s['walk_one'])} | {fmt(s['walk_many'])} |",
             f"| per layer after the first (s) | {s['per_layer_one']:.2f} | {s['per_layer_many']:.2f} |",
             f"| speed-up | 1x | {s['ratio']:.2f}x |",
             f"| peak GPU memory (GiB) | {fmt(s['gpu_peak_gib_one'])} | "
             + " / ".join(fmt(v) for v in s["gpu_peak_gib_per_rank"]) + " (per rank) |", "",
             f"Checkpoints: {c['identical']} of {c['tensors']} tensors identical; {c['elements_differing']} of "
             f"{c['elements_total']} stored elements differ. Token counts per module "
             f"{'identical' if m['tokens_equal'] else 'DIFFER'}; relative output error per module: largest "
             f"relative difference {m['rel_error_max_relative_difference']:.2e}, mean "
             f"{m['rel_error_mean_relative_difference']:.2e}.", "",
             f"Control, one GPU with {r['control']['batch_size']} windows per forward instead of "
             f"{r['batch_size_per_rank']}: {cc['identical']} of {cc['tensors']} tensors identical; "
             f"{cc['elements_differing']} of {cc['elements_total']} stored elements differ; token counts "
             f"{'identical' if cm['tokens_equal'] else 'differ'}; largest relative difference of a module's error "
             f"{cm['rel_error_max_relative_difference']:.2e}, mean {cm['rel_error_mean_relative_difference']:.2e}.", "",
             f"| layer | mean error, 1 GPU | mean error, DDP | mean error, 1 GPU, batch {r['control']['batch_size']} |",
             "|---|---|---|---|"]
    lines += [f"| {x['layer']} | {x['one']:.6f} | {x['many']:.6f} | {y['many']:.6f} |"
              for x, y in zip(m["layers"], cm["layers"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
