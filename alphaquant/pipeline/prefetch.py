"""Reading the next decoder layer from disk while the current one computes.

A lazy model's layer comes from the checkpoint: the read (page faults on the safetensors
mmap, the cast, the copy into page-locked memory) is host and disk work that does not need
the accelerator, so a single background thread does it for layer i+1 while layer i runs its
passes. At most two layers are in host memory at once (the one being installed and the next).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class LayerPrefetcher:
    def __init__(self, adapter, model, n_layers: int, pin_memory: bool):
        self.adapter, self.model, self.n, self.pin = adapter, model, n_layers, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._pending: dict[int, Future] = {}

    def request(self, i: int) -> None:
        """Start reading layer i (no-op past the last layer or if already asked)."""
        if 0 <= i < self.n and i not in self._pending:
            self._pending[i] = self._pool.submit(self.adapter.read_layer, self.model, i, self.pin)

    def take(self, i: int):
        """Layer i's host tensors (None for an eager model); waits for the read, re-raises its error.

        A layer nobody asked for earlier (the first) is read here, into pageable memory: nothing runs
        beside this read, and page-locking a layer's worth of host memory (cudaHostAlloc: 0.6 s for
        0.8 GB on the H100 host) costs far more than the pageable copy to the device it would save.
        Layers read in the background are pinned (their copies to the device are then asynchronous),
        and their pinned blocks are reused by the next layers through torch's host allocator cache."""
        if i not in self._pending:
            return self.adapter.read_layer(self.model, i, False)
        return self._pending.pop(i).result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
