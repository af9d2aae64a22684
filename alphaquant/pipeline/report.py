"""The end-of-run summary: per-layer error and time, tokens per expert, perplexity, memory.

Pure data in, rows/JSON out; `print_summary` renders them with rich on rank 0.
"""
from __future__ import annotations

import re
import statistics
from collections import defaultdict

_EXPERT = re.compile(r"^(?P<layer>.*?\.layers\.\d+)\.(?P<block>.+?)\.experts\.(?P<e>\d+)\.")


def expert_token_table(records: dict, min_tokens: int) -> list[dict]:
    """Per MoE block: min/median/max tokens per expert and the experts below `min_tokens`.

    Token counts come from each expert's first linear (gate/up/w1 see the routed tokens).
    """
    per_block: dict[str, dict[int, int]] = defaultdict(dict)
    for name, r in records.items():
        m = _EXPERT.match(name)
        if m:
            key = f"{m['layer']}.{m['block']}"
            e = int(m["e"])
            per_block[key][e] = max(per_block[key].get(e, 0), r.tokens)
    rows = []
    for block, counts in per_block.items():
        vals = [counts[e] for e in sorted(counts)]
        rows.append({"block": block, "experts": len(vals), "min": min(vals),
                     "median": statistics.median(vals), "max": max(vals),
                     "below_threshold": [e for e in sorted(counts) if counts[e] < min_tokens],
                     "counts": vals})
    return rows


def layer_error_table(records: dict, layer_stats) -> list[dict]:
    """Per decoder layer: mean/max relative output error of its linears, fallbacks, time."""
    by_layer = defaultdict(list)
    for name, r in records.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            by_layer[int(m.group(1))].append(r)
    rows = []
    for st in layer_stats:
        recs = by_layer.get(st.index, [])
        errs = [r.rel_error for r in recs]
        rows.append({"layer": st.index, "modules": len(recs),
                     "mean_rel_error": statistics.fmean(errs) if errs else 0.0,
                     "max_rel_error": max(errs) if errs else 0.0,
                     "fallbacks": sum(r.fallback is not None for r in recs),
                     "seconds": st.seconds, "phases": st.phases, "passes": st.passes, "restored": st.restored})
    return rows


def print_summary(console, layers, experts, ppl: dict, totals: dict) -> None:
    from rich.table import Table

    t = Table(title="Per-layer results")
    for col in ("layer", "linears", "mean rel. err", "max rel. err", "RTN fallbacks", "seconds"):
        t.add_column(col, justify="right")
    for r in layers:
        t.add_row(str(r["layer"]), str(r["modules"]), f"{r['mean_rel_error']:.4g}",
                  f"{r['max_rel_error']:.4g}", str(r["fallbacks"]),
                  f"{r['seconds']:.2f}" + (" (resumed)" if r.get("restored") else ""))
    console.print(t)
    if experts:
        t = Table(title="Tokens per expert")
        for col in ("block", "experts", "min", "median", "max", "below threshold"):
            t.add_column(col, justify="right")
        for r in experts:
            t.add_row(r["block"], str(r["experts"]), str(r["min"]), f"{r['median']:g}", str(r["max"]),
                      ",".join(map(str, r["below_threshold"])) or "-")
        console.print(t)
    t = Table(title="Run")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in ppl.items():
        t.add_row(f"perplexity {k}", f"{v:.4f}")
    for k, v in totals.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
