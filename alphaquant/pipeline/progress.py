"""Progress over the layer walk, on rank 0 only, on stdout (stderr is kept for the one-line error).

Lightning's own bar is per predict call, and a run makes several calls per layer, so the
useful unit of progress is the decoder layer; the description shows the current pass.

On a terminal (stdout and stderr both TTYs) that is a rich bar. Anywhere else (a batch
scheduler's log file, a pipe) a live bar prints nothing until it stops, so instead each finished
layer and each evaluation stream is one line, flushed at once:

    [quantize: routed Hessians] layer 3/16 done in 1.4s, mean rel. error 0.1126, ETA 18s
    [quantize: routed Hessians] perplexity quantized: 58.202

The label tells runs of one command apart (the saved run, and the `eval.compare_hessians` runs).
"""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class LayerProgress:
    def __init__(self, n_layers: int, enabled: bool = True, label: str = "quantize", stream=None, lines=None):
        self.n, self.enabled, self.label, self._p = n_layers, enabled, label, None
        self.stream = stream if stream is not None else sys.stdout
        # lines: one line per event (no terminal to redraw a bar on); None = decide from the streams
        self.lines = no_terminal(self.stream) if lines is None else lines
        self._t0 = self._done = 0

    def __enter__(self):
        self._t0, self._done = time.perf_counter(), 0
        if self.enabled and not self.lines:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), transient=False, console=Console(file=self.stream))
            self._p.start()
            self._task = self._p.add_task(f"{self.label}: layer 0", total=self.n)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()
        return False

    def _line(self, text: str) -> None:
        if self.enabled and self.lines:
            print(f"[{self.label}] {text}", file=self.stream, flush=True)

    def group_done(self, layer: int, group: int) -> None:
        if self._p is not None:
            self._p.update(self._task, description=f"{self.label}: layer {layer}, group {group + 1} solved")

    def layer_done(self, layer: int, stats, mean_error: float | None = None) -> None:
        self._done += 1
        if self._p is not None:
            self._p.update(self._task, advance=1, description=f"{self.label}: layer {layer} done ({stats.seconds:.1f}s)")
        per_layer = (time.perf_counter() - self._t0) / self._done
        left = self.n - self._done
        err = f", mean rel. error {mean_error:.4f}" if mean_error is not None else ""
        what = "replayed from the resume state" if getattr(stats, "restored", False) else "done"
        self._line(f"layer {layer + 1}/{self.n} {what} in {stats.seconds:.1f}s{err}, "
                   f"ETA {_duration(per_layer * left) if left else '0s'}")

    def stream_done(self, name: str, perplexity: float) -> None:
        """One evaluation stream finished (its head pass gave the perplexity)."""
        self._line(f"perplexity {name}: {perplexity:.3f}")


def no_terminal(stream) -> bool:
    """True unless both `stream` and stderr are terminals (a scheduler redirects both, a pipe one)."""
    return not (_isatty(stream) and _isatty(sys.stderr))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class WindowProgress:
    """Progress over the evaluation windows of `--eval-only` (one forward per batch, no layer walk):
    a rich bar on a terminal, else about ten flushed lines (and the last one). On stderr: the
    stdout of --eval-only is its JSON result, for a pipe into jq.

        [eval-only] windows 8/16, 2.1s, ETA 2s
    """

    def __init__(self, total: int, label: str = "eval-only", stream=None, lines=None, every: int | None = None):
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.lines = no_terminal(self.stream) if lines is None else lines
        self.every = every if every is not None else max(1, total // 10)
        self._p, self._next = None, self.every

    def __enter__(self):
        self._t0 = time.perf_counter()
        if not self.lines:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._p = Progress(TextColumn(f"{self.label}: windows"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(file=self.stream))
            self._p.start()
            self._task = self._p.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()
        return False

    def update(self, done: int) -> None:
        """`done` windows of `total` evaluated."""
        if self._p is not None:
            self._p.update(self._task, completed=done)
            return
        if done < self._next and done < self.total:
            return
        while self._next <= done:
            self._next += self.every
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        print(f"[{self.label}] windows {done}/{self.total}, {elapsed:.1f}s, ETA {_duration(eta)}",
              file=self.stream, flush=True)
