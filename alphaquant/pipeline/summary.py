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
    if res["output_dir"]:
        totals["checkpoint"] = res["output_dir"]
    print_summary(Console(), res["layers"], res["experts"], res["perplexity"], totals)
