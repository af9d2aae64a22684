"""End of a run: the console summary (rank 0) and the final metrics to every logger."""
from __future__ import annotations


def finish_run(session, seconds: float) -> None:
    res = session.results
    res["seconds_total"] = seconds
    metrics = {f"ppl/{k}": v for k, v in res["perplexity"].items()}
    metrics.update({"time/total_s": seconds, "time/solve_s": res["solve_seconds"],
                    **{f"memory/{k}": v for k, v in res["memory"].items()}})
    n_layers = len(res["layers"])
    for lg in session.loggers:
        lg.log_metrics(metrics, step=n_layers)
        lg.finalize("success")
    if session.trainer.global_rank != 0:
        return
    from rich.console import Console

    from alphaquant.pipeline.report import print_summary
    totals = {"total seconds": seconds, "solve seconds": res["solve_seconds"],
              "calibration tokens": res["calibration_tokens"],
              "peak host RSS (GiB)": res["memory"]["host_rss_bytes"] / 2**30}
    if "accelerator_bytes" in res["memory"]:
        totals["peak accelerator (GiB)"] = res["memory"]["accelerator_bytes"] / 2**30
    if "budget" in res:                 # quant.budget_bits: what the per-module choice reached
        b = res["budget"]
        totals["average bits (budget)"] = f"{b['average_bits']:.3f} ({b['budget_bits']})"
        totals["modules per format"] = ", ".join(f"{k}: {v}" for k, v in b["modules_per_format"].items())
    if res["output_dir"]:
        totals["checkpoint"] = res["output_dir"]
    console = Console()
    print_summary(console, res["layers"], res["experts"], res["perplexity"], totals)
    print_serving_warnings(console, res["output_dir"])


def print_serving_warnings(console, output_dir) -> list[str]:
    """One line per reader known to misread this checkpoint (alphaquant.export.compat), last in the run."""
    import json
    from pathlib import Path

    from alphaquant.export.compat import serving_warnings
    cfg = Path(output_dir) / "config.json" if output_dir else None
    if cfg is None or not cfg.is_file():
        return []
    lines = serving_warnings(json.loads(cfg.read_text()))
    from rich.text import Text
    for line in lines:                  # Text: the line's brackets and regexes are not rich markup
        console.print(Text("warning: ", style="bold yellow") + Text(line), soft_wrap=True)
    return lines
