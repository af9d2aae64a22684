"""PNG plots of a run: relative output error per layer and tokens per expert.

Written next to the checkpoint (plots/) and logged as images to W&B when it is on.

On a GPU run they are drawn by `PlotWorkers`, one child Python process per figure, started after the first layer:
matplotlib's import and first figure (~1 s) and the drawing itself (~0.2-0.4 s of pure Python) then run on other
cores, both figures at once, instead of sharing the GIL with the layer walk and with the last shard's write at the end (in a thread, the
import stalled the walk's second layer by ~0.3 s and the drawing took 0.5-1.1 s beside the write on an H200
host). The figures' data (errors and token counts) is final once the last layer is solved, so the walk hands it to
the children then (`PlotWorkers.start`) and they draw while the last layer is written; the end of the run only
collects the files. This file is the child's program too (`python plots.py --serve`: it imports matplotlib and
nothing of alphaquant). CPU runs draw in-process (a thread warms pyplot up after the first layer).
"""
from __future__ import annotations

import json
import subprocess
import sys
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
    try:
        _warm_figure()
    except Exception:   # noqa: BLE001 - save_plots imports again and reports it where the plots are drawn
        pass


def _warm_figure():
    import io
    plt = _import_pyplot()
    fig, ax = plt.subplots(figsize=(2, 1.5))
    im = ax.imshow([[0, 1], [2, 3]], aspect="auto", cmap="viridis")
    ax.set(xlabel="x", ylabel="y", title="t")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    plt.close(fig)


FIGURES = ("layer_error", "tokens_per_expert")
_NEEDS = {"layer_error": "layers", "tokens_per_expert": "experts"}     # the part of the results each figure draws
_FIELDS = {"layers": ("layer", "mean_rel_error", "max_rel_error"), "experts": ("block", "counts")}  # what it reads


def plot_data(results: dict, figures: tuple[str, ...] = FIGURES) -> dict:
    """The part of a run's results that `figures` draw (save_plots draws the same from it as from the results):
    what a worker is sent, and what tells whether the figures it drew early are still the run's."""
    out = {}
    for f in figures:
        part = _NEEDS[f]
        out[part] = [{k: row[k] for k in _FIELDS[part]} for row in results.get(part) or []]
    return out


class PlotWorker:
    """save_plots of some figures in a child process (see the module docstring). `send` hands it the request
    without waiting, `collect` waits for its paths (raises if it failed), `close` ends the child; PlotWorkers
    draws with them and falls back to this process, so the plots are never lost to a child."""

    TIMEOUT_S = 120.0

    def __init__(self, figures: tuple[str, ...] = FIGURES):
        self.figures = tuple(figures)
        self.proc: subprocess.Popen | None = None
        try:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)
        except OSError:
            self.proc = None

    def send(self, results: dict, directory: Path) -> None:
        if self.proc is None:
            raise OSError("no plot worker")
        request = {"results": plot_data(results, self.figures), "only": list(self.figures),
                   "directory": str(directory)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def collect(self) -> dict[str, Path]:
        if self.proc is None:
            raise OSError("no plot worker")
        out, _ = self.proc.communicate(timeout=self.TIMEOUT_S)
        reply = json.loads(out.strip().splitlines()[-1]) if out and out.strip() else {}
        if self.proc.returncode != 0 or "paths" not in reply:
            raise ValueError(reply.get("error", f"plot worker exited with {self.proc.returncode}"))
        return {k: Path(v) for k, v in reply["paths"].items()}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class PlotWorkers:
    """PlotWorkers drawing at the same time, by default one per figure: the figures are independent, and at the end
    of a run the drawing (~0.15-0.3 s of pure Python a figure) is all that is left beside the last shard's write.
    `groups`: the figures of each worker. A worker that cannot start or fails (TypeError: results JSON cannot
    encode) has its figures drawn in this process."""

    def __init__(self, groups: tuple[tuple[str, ...], ...] = tuple((f,) for f in FIGURES)):
        self.workers = [PlotWorker(g) for g in groups]
        self._sent: tuple[dict, Path, list[PlotWorker]] | None = None     # start's request and its workers

    def start(self, results: dict, directory: Path) -> None:
        """Have the workers draw these results now (their one request); `draw` with the same figures' data and
        directory then only collects the files."""
        if self._sent is not None:
            return
        sent = []
        for w in self.workers:
            try:
                w.send(results, directory)
                sent.append(w)
            except (OSError, ValueError, TypeError, KeyError):
                w.close()
        self._sent = (plot_data(results), Path(directory), sent)

    def draw(self, results: dict, directory: Path) -> dict[str, Path]:
        if self._sent is None:
            self.start(results, directory)
        data, where, sent = self._sent
        if data != plot_data(results) or where != Path(directory):     # drawn from other data: not these plots
            self.close()
            return save_plots(results, directory)
        out, ok = {}, set()
        for w in sent:
            try:
                out.update(w.collect())
                ok.add(w)
            except (OSError, ValueError, TypeError, KeyError, subprocess.TimeoutExpired):
                pass
        missing = tuple(f for w in self.workers if w not in ok for f in w.figures)
        self.close()
        if missing:
            out.update(save_plots(results, directory, only=missing))
        return {f: out[f] for f in FIGURES if f in out}

    def close(self) -> None:
        for w in self.workers:
            w.close()


def _serve() -> int:
    """The child: warm matplotlib up, then draw the one request read from stdin; the paths as one JSON line."""
    try:
        _warm_figure()
    except Exception:   # noqa: BLE001 - reported with the request below
        pass
    line = sys.stdin.readline()
    if not line:
        return 0            # the parent went away (or closed it): nothing to draw
    try:
        req = json.loads(line)
        paths = save_plots(req["results"], Path(req["directory"]), only=tuple(req.get("only", FIGURES)))
        print(json.dumps({"paths": {k: str(v) for k, v in paths.items()}}), flush=True)
        return 0
    except Exception as e:   # noqa: BLE001 - the parent draws in-process instead
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1


def save_plots(results: dict, directory: Path, only: tuple[str, ...] = FIGURES) -> dict[str, Path]:
    """The figures named in `only` (all by default) as PNG files in `directory`; {figure: path} of those drawn
    (a figure without data is not drawn)."""
    if _PRELOAD is not None:
        _PRELOAD.join()
    plt = _import_pyplot()

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    layers = results.get("layers") if "layer_error" in only else None
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
    experts = results.get("experts") if "tokens_per_expert" in only else None
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


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)     # run as a script: this package's modules (signals, session, ...) must not shadow others
    sys.exit(_serve())
