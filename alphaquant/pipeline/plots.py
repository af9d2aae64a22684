"""PNG plots of a run: relative output error per layer and tokens per expert.

Written next to the checkpoint (plots/) and logged as images to W&B when it is on.
"""
from __future__ import annotations

from pathlib import Path


def save_plots(results: dict, directory: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")                 # headless: no display on CI or GPU machines
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    layers = results["layers"]
    if layers:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        idx = [r["layer"] for r in layers]
        ax.bar(idx, [r["mean_rel_error"] for r in layers], label="mean over linears")
        ax.plot(idx, [r["max_rel_error"] for r in layers], "o-", color="C3", label="worst linear")
        ax.set(xlabel="decoder layer", ylabel="relative output error", title="GPTQ error per layer")
        ax.legend()
        fig.tight_layout()
        out["layer_error"] = directory / "layer_error.png"
        fig.savefig(out["layer_error"], dpi=110)
        plt.close(fig)
    experts = results["experts"]
    if experts:
        width = max(len(r["counts"]) for r in experts)
        grid = [r["counts"] + [0] * (width - len(r["counts"])) for r in experts]
        fig, ax = plt.subplots(figsize=(min(2 + 0.25 * width, 16), 1 + 0.4 * len(experts)))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE block", title="calibration tokens per expert")
        ax.set_yticks(range(len(experts)), [r["block"].replace("model.layers.", "L") for r in experts])
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out["tokens_per_expert"] = directory / "tokens_per_expert.png"
        fig.savefig(out["tokens_per_expert"], dpi=110)
        plt.close(fig)
    return out


def log_plots(loggers, paths: dict[str, Path]) -> None:
    for lg in loggers:
        if hasattr(lg, "log_image"):                       # WandbLogger
            for key, path in paths.items():
                lg.log_image(key=f"plots/{key}", images=[str(path)])
