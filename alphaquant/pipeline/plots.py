"""PNG plots of a run: relative output error per layer and tokens per expert.

Written next to the checkpoint (plots/) and logged as images to W&B when it is on.
"""
from __future__ import annotations

import threading
from pathlib import Path


def _import_pyplot():
    import matplotlib

    matplotlib.use("Agg")                 # headless: no display on CI or GPU machines
    import matplotlib.pyplot as plt
    return plt


def preload_pyplot() -> threading.Thread:
    """Import matplotlib and draw a throw-away figure in a background thread while the walk runs. The first
    save_plots of a process took ~1.0 s on an H200 machine, the next ones ~0.37 s: the import, the font files
    (and, on a new machine, matplotlib's font cache) and the Agg renderer's set-up are paid once, here, instead of
    after the last layer. save_plots' own import then finds matplotlib loaded (or waits on Python's import lock
    for the rest of it)."""
    global _PRELOAD
    t = threading.Thread(target=_warm_quietly, name="preload-pyplot", daemon=True)
    t.start()
    _PRELOAD = t
    return t


_PRELOAD: threading.Thread | None = None     # pyplot is not thread-safe: save_plots waits for the warm figure


def _warm_quietly():
    import io
    try:
        plt = _import_pyplot()
        fig, ax = plt.subplots(figsize=(2, 1.5))
        im = ax.imshow([[0, 1], [2, 3]], aspect="auto", cmap="viridis")
        ax.set(xlabel="x", ylabel="y", title="t")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(io.BytesIO(), format="png", dpi=30)
        plt.close(fig)
    except Exception:   # noqa: BLE001 - save_plots imports again and reports it where the plots are drawn
        pass


def save_plots(results: dict, directory: Path) -> dict[str, Path]:
    if _PRELOAD is not None:
        _PRELOAD.join()
    plt = _import_pyplot()

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
