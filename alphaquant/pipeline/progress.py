"""Progress over the layer walk (rich), on rank 0 only.

Lightning's own bar is per predict call, and a run makes several calls per layer, so the
useful unit of progress is the decoder layer; the description shows the current pass.
"""
from __future__ import annotations


class LayerProgress:
    def __init__(self, n_layers: int, enabled: bool = True):
        self.n, self.enabled, self._p = n_layers, enabled, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), transient=False)
            self._p.start()
            self._task = self._p.add_task("calibrating layer 0", total=self.n)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()
        return False

    def group_done(self, layer: int, group: int) -> None:
        if self._p is not None:
            self._p.update(self._task, description=f"layer {layer}: group {group + 1} solved")

    def layer_done(self, layer: int, stats) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, description=f"layer {layer} done ({stats.seconds:.1f}s)")
