"""Python's cyclic garbage collector during the layer walk: frozen heap, timed collections.

A run holds ~0.4-0.5 M tracked Python objects before its first layer (torch, transformers, Lightning, the model's
modules, Triton's compiled kernels), and almost all of them live until the process ends. A full (generation 2)
collection walks every one of them: ~0.25 s on this project's CPU machine, and on an H200 host it showed as
0.3-0.4 s stalls at the same two layers of every OLMoE run (bench/e2e.py: layers 1 and 13, whose routed-Hessian
pass took 0.5 s instead of 0.15 s), i.e. ~5 % of the whole run with the GPU idle.

`gc.freeze()` moves every object alive at the start of the walk into the permanent generation, which collections
skip; objects made later (per-batch tensors, records) are collected as before, so a reference cycle made during
the walk is still freed. `gc.unfreeze()` at the end hands the frozen objects back to the oldest generation (an
interpreter that exits with frozen objects leaves them unfinalised, and nanobind, Triton's binding library,
then reports them as leaks). Nothing here changes a result: only when the collector looks, not what it frees.

`GCWatch` counts the collections and their seconds (gc.callbacks), so a run's summary says what the collector cost.
"""
from __future__ import annotations

import contextlib
import gc
import time


class GCWatch:
    """Collections and their seconds while installed: `counts[gen]`, `seconds` (all generations), `take()` the
    seconds since the last take (a layer's share)."""

    def __init__(self):
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._taken = 0.0
        self._t0 = None

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.counts[min(int(info.get("generation", 2)), 2)] += 1
            self._t0 = None

    def take(self) -> float:
        dt, self._taken = self.seconds - self._taken, self.seconds
        return dt

    def summary(self) -> dict:
        return {"seconds": self.seconds, "collections": {f"gen{g}": n for g, n in enumerate(self.counts)}}

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)


@contextlib.contextmanager
def frozen_heap():
    """Collections skip every object alive now until the block ends (see the module docstring)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
