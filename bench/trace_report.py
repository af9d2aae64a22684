"""Where the GPU waits: a report over a torch.profiler timeline (`bench/e2e.py --profile --trace`).

    python bench/trace_report.py WORKDIR/trace.json.gz [--layers 1:14] [--out report.json]

Prints, per decoder layer and pass (the `pass:<phase>:<stream>:g<group>` ranges bench/e2e.py records):
the pass's host wall time, the GPU time of the kernels it launched and the GPU's idle time inside it; then
the idle time of the whole run (or, with --layers, of those layers, per layer) by what the main thread was
doing while the GPU had nothing to run (the outermost host op that overlaps the gap, or "python" where no op
ran: interpreter work between ops), and the kernels by total GPU time. A layer starts at its first collect
pass (g0).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import sys
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def merge(intervals):
    """Union of [start, end) intervals, sorted."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def covered(merged, lo, hi) -> float:
    """How much of [lo, hi) the merged intervals cover."""
    total = 0.0
    i = max(0, bisect.bisect_right([m[0] for m in merged], lo) - 1)
    while i < len(merged) and merged[i][0] < hi:
        total += max(0.0, min(hi, merged[i][1]) - max(lo, merged[i][0]))
        i += 1
    return total


def outermost(ops):
    """The ops not inside another op of the list (same thread), by start time."""
    out, end = [], -1.0
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def innermost_segments(ranges) -> list[tuple[float, float, str]]:
    """(start, end, name of the innermost range) over properly nested ranges of one thread."""
    segs, stack, cur = [], [], None
    for e in sorted(ranges, key=lambda e: (e["ts"], -e["dur"])):
        s = e["ts"]
        while stack and stack[-1][0] <= s:
            end, name = stack.pop()
            if cur < end:
                segs.append((cur, end, name))
            cur = max(cur, end)
        if stack and cur < s:
            segs.append((cur, s, stack[-1][1]))
        cur = s
        stack.append((s + e["dur"], e["name"]))
    while stack:
        end, name = stack.pop()
        if cur < end:
            segs.append((cur, end, name))
        cur = max(cur, end)
    return segs


def report(events: list[dict], min_gap_us: float = 20.0) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    passes = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("pass:")),
                    key=lambda e: e["ts"])
    if not passes:
        raise SystemExit("no pass: ranges in this trace: record it with bench/e2e.py --profile --trace")
    main_tid = passes[0]["tid"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    busy = merge((e["ts"], e["ts"] + e["dur"]) for e in gpu)
    host_ops = outermost([e for e in events if e.get("cat") == "cpu_op" and e["tid"] == main_tid])
    op_starts = [e["ts"] for e in host_ops]

    # passes -> layers
    layer, rows = -1, []
    for p in passes:
        if p["name"].startswith("pass:collect:calib:g0"):
            layer += 1
        rows.append({"layer": layer, "pass": p["name"][5:], "ts": p["ts"], "end": p["ts"] + p["dur"],
                     "wall_ms": p["dur"] / 1e3, "gpu_ms": 0.0, "kernels": 0})
    starts = [r["ts"] for r in rows]
    for k in gpu:                       # a kernel counts in the pass that launched it
        launch = launches.get(k.get("args", {}).get("correlation"))
        t = launch["ts"] if launch is not None else k["ts"]
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t <= rows[i]["end"]:
            rows[i]["gpu_ms"] += k["dur"] / 1e3
            rows[i]["kernels"] += 1
    for r in rows:
        r["gpu_idle_ms"] = (r["end"] - r["ts"] - covered(busy, r["ts"], r["end"])) / 1e3

    # GPU idle time over the run, by what the main thread was doing
    t0, t1 = min(e["ts"] for e in events), max(e["ts"] + e["dur"] for e in events)
    gaps = [(a, b) for (a, b) in zip([t0] + [m[1] for m in busy], [m[0] for m in busy] + [t1]) if b - a >= min_gap_us]
    by_op = collections.Counter()
    by_pass = collections.Counter()
    for a, b in gaps:
        i = max(0, bisect.bisect_right(op_starts, a) - 1)
        seen = 0.0
        while i < len(host_ops) and host_ops[i]["ts"] < b:
            o = host_ops[i]
            ov = max(0.0, min(b, o["ts"] + o["dur"]) - max(a, o["ts"]))
            if ov > 0:
                by_op[o["name"]] += ov
                seen += ov
            i += 1
        by_op["python (no op on the main thread)"] += (b - a) - seen
        j = bisect.bisect_right(starts, a) - 1
        where = (f"L{rows[j]['layer']} " if rows[j]['layer'] >= 0 else "") + rows[j]["pass"] \
            if j >= 0 and a < rows[j]["end"] else "outside passes"
        by_pass[where.split(" ", 1)[-1] if where != "outside passes" else where] += b - a
    # ... and by the innermost profiler range the main thread was in (bench/profile_ranges.py's aq:<function>)
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e["tid"] == main_tid]
    segs = innermost_segments(ranges)
    seg_starts = [s[0] for s in segs]
    by_range = collections.Counter()
    for a, b in gaps:
        i, seen = max(0, bisect.bisect_right(seg_starts, a) - 1), 0.0
        while i < len(segs) and segs[i][0] < b:
            ov = max(0.0, min(b, segs[i][1]) - max(a, segs[i][0]))
            by_range[segs[i][2].split(":g")[0] if segs[i][2].startswith("pass:") else segs[i][2]] += ov
            seen += ov
            i += 1
        by_range["(no range)"] += (b - a) - seen
    biggest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:15]:
        i = max(0, bisect.bisect_right(seg_starts, a) - 1)
        names = []
        while i < len(segs) and segs[i][0] < b:
            if segs[i][1] > a and segs[i][2] not in names:
                names.append(segs[i][2])
            i += 1
        biggest.append({"at_s": (a - t0) / 1e6, "ms": (b - a) / 1e3, "ranges": names[:6]})
    kernels = collections.Counter()
    counts = collections.Counter()
    for k in gpu:
        kernels[k["name"][:90]] += k["dur"]
        counts[k["name"][:90]] += 1
    # GPU time by where it was launched: the innermost range on the main thread and the outermost host op there
    gpu_by_range, gpu_by_site = collections.Counter(), collections.Counter()
    for k in gpu:
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is None or launch["tid"] != main_tid:
            where, op = "(not launched by the main thread)", ""
        else:
            t = launch["ts"]
            i = bisect.bisect_right(seg_starts, t) - 1
            where = segs[i][2] if i >= 0 and t < segs[i][1] else "(no range)"
            where = where.split(":g")[0] if where.startswith("pass:") else where
            j = bisect.bisect_right(op_starts, t) - 1
            op = host_ops[j]["name"] if j >= 0 and t < host_ops[j]["ts"] + host_ops[j]["dur"] else ""
        gpu_by_range[where] += k["dur"]
        gpu_by_site[f"{where} / {op}" if op else where] += k["dur"]
    return {
        "span_s": (t1 - t0) / 1e6, "gpu_busy_s": sum(b - a for a, b in busy) / 1e6,
        "gpu_idle_s": sum(b - a for a, b in gaps) / 1e6,
        "passes": [{k: v for k, v in r.items() if k not in ("ts", "end")} for r in rows],
        "idle_by_host_op_ms": {k: v / 1e3 for k, v in by_op.most_common(25)},
        "idle_by_pass_ms": {k: v / 1e3 for k, v in by_pass.most_common()},
        "idle_by_range_ms": {k: v / 1e3 for k, v in by_range.most_common(40)},
        "largest_gaps": biggest,
        "kernels_ms": [{"kernel": k, "ms": v / 1e3, "count": counts[k]} for k, v in kernels.most_common(30)],
        "gpu_by_range_ms": {k: v / 1e3 for k, v in gpu_by_range.most_common(40)},
        "gpu_by_site_ms": {k: v / 1e3 for k, v in gpu_by_site.most_common(50)},
    }


def layer_window(events: list[dict], first: int, last: int) -> list[dict]:
    """The events that start while layers first..last (inclusive) run: from layer `first`'s first pass (g0) to the
    start of layer last+1's (or the end of the timeline)."""
    starts = sorted(e["ts"] for e in events
                    if e.get("cat") == "user_annotation" and e["name"].startswith("pass:collect:calib:g0"))
    if not 0 <= first <= last < len(starts):
        raise SystemExit(f"--layers {first}:{last}: the trace holds layers 0-{len(starts) - 1}")
    lo = starts[first]
    hi = starts[last + 1] if last + 1 < len(starts) else float("inf")
    return [e for e in events if lo <= e["ts"] < hi]


def per_layer(r: dict, layers: int) -> dict:
    """A report of several layers' window with its time figures divided by the number of layers."""
    out = dict(r)
    for k in ("span_s", "gpu_busy_s", "gpu_idle_s"):
        out[k] = r[k] / layers
    for k in ("idle_by_host_op_ms", "idle_by_pass_ms", "idle_by_range_ms", "gpu_by_range_ms", "gpu_by_site_ms"):
        out[k] = {n: v / layers for n, v in r[k].items()}
    out["kernels_ms"] = [{**k, "ms": k["ms"] / layers, "count": k["count"] / layers} for k in r["kernels_ms"]]
    out["layers"] = layers
    return out


def _ms_table(title: str, rows: dict) -> None:
    print(f"\n| {title} | ms |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |")


def print_report(r: dict) -> None:
    print(f"timeline {r['span_s']:.2f} s: GPU busy {r['gpu_busy_s']:.2f} s, idle {r['gpu_idle_s']:.2f} s")
    print("\n| layer | pass | host wall (ms) | GPU kernels (ms) | GPU idle in pass (ms) | kernels |\n|---|---|---|---|---|---|")
    for p in r["passes"]:
        print(f"| {p['layer']} | {p['pass']} | {p['wall_ms']:.1f} | {p['gpu_ms']:.1f} | {p['gpu_idle_ms']:.1f} | {p['kernels']} |")
    _ms_table("GPU idle while the main thread ran", r["idle_by_host_op_ms"])
    _ms_table("GPU idle by pass kind", r["idle_by_pass_ms"])
    _ms_table("GPU idle by innermost range on the main thread", r["idle_by_range_ms"])
    print("\n| largest GPU idle stretches: at (s) | ms | ranges the main thread was in |\n|---|---|---|")
    for g in r["largest_gaps"]:
        print(f"| {g['at_s']:.3f} | {g['ms']:.1f} | {' > '.join(g['ranges'])} |")
    _ms_table("GPU kernel time by the innermost range that launched it", r["gpu_by_range_ms"])
    _ms_table("GPU kernel time by range / outermost host op at the launch", r["gpu_by_site_ms"])
    print("\n| kernel | GPU ms | count |\n|---|---|---|")
    for k in r["kernels_ms"]:
        print(f"| {k['kernel']} | {k['ms']:.1f} | {k['count']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--min-gap-us", type=float, default=20.0, help="GPU idle stretches shorter than this are ignored")
    p.add_argument("--layers", metavar="FIRST:LAST",
                   help="only these decoder layers (e.g. 1:14, the steady ones of 16), time figures per layer")
    p.add_argument("--out", type=Path, help="the report as JSON")
    a = p.parse_args(argv)
    if not a.trace.is_file():
        print(f"error: no trace file at {a.trace}", file=sys.stderr)
        return 2
    try:
        return _report_file(a)
    except SystemExit as e:           # the trace holds no pass ranges, or not those layers: one line, exit 2
        if isinstance(e.code, str):
            print(f"error: {a.trace}: {e.code}", file=sys.stderr)
            return 2
        raise
    except (OSError, EOFError, ValueError, KeyError) as e:   # not a JSON timeline (damaged, truncated, other)
        print(f"error: {a.trace} is not a readable torch.profiler trace ({type(e).__name__}: {e})", file=sys.stderr)
        return 2


def _report_file(a) -> int:
    if a.layers:
        try:
            first, last = (int(v) for v in a.layers.split(":"))
        except ValueError:
            print(f"error: --layers takes FIRST:LAST (two layer indices), got {a.layers!r}", file=sys.stderr)
            return 2
    events = load(a.trace)
    if a.layers:
        r = per_layer(report(layer_window(events, first, last), a.min_gap_us), last - first + 1)
        print(f"layers {first}-{last}, per layer:")
    else:
        r = report(events, a.min_gap_us)
    print_report(r)
    if a.out:
        a.out.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
