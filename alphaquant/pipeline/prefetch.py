"""Reading the next decoder layer from disk while the current one computes.

A lazy model's layer comes from the checkpoint: the read (page faults on the safetensors
mmap, the cast, the copy into page-locked memory) is host and disk work that does not need
the accelerator, so a single background thread does it for layer i+1 while layer i runs its
passes. At most two layers are in host memory at once (the one being installed and the next).

With `device` (a CUDA device) the thread also copies the layer there, on a stream of its own, and checks it for
NaN/Inf (`adapter.place_layer`): the copy (~0.85 GB for an OLMoE-1B-7B layer, ~17 ms of the copy engine) and the
check's host sync then overlap the current layer's kernels instead of opening the next layer with them (the
layer's "load" phase was 33-50 ms on an H200). It costs one more layer's weights on the device (the walker
asks for it unless calibration.cache_device is cpu; pipeline/memory_plan.py counts it).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class LayerPrefetcher:
    def __init__(self, adapter, model, n_layers: int, pin_memory: bool, device: torch.device | None = None):
        self.adapter, self.model, self.n, self.pin = adapter, model, n_layers, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._pending: dict[int, Future] = {}
        self.device = torch.device(device) if device is not None else None
        self._stream = torch.cuda.Stream(self.device) if self.device is not None and self.device.type == "cuda" \
            else None

    @classmethod
    def for_walk(cls, adapter, model, device: torch.device, cache_on_host: bool) -> "LayerPrefetcher":
        """The walk's prefetcher: pinned reads on a GPU, and the copy ahead to it unless the run keeps its memory
        low (calibration.cache_device cpu)."""
        on_gpu = device.type == "cuda"
        return cls(adapter, model, adapter.num_layers(model), pin_memory=on_gpu,
                   device=device if on_gpu and not cache_on_host else None)

    def request(self, i: int) -> None:
        """Start reading layer i (no-op past the last layer or if already asked)."""
        if 0 <= i < self.n and i not in self._pending:
            self._pending[i] = self._pool.submit(self._read, i)

    def matches(self, other: "LayerPrefetcher") -> bool:
        """Reads the same layers of the same model to the same place (and pins them alike) as `other`."""
        return (self.adapter is other.adapter and self.model is other.model and self.n == other.n
                and self.device == other.device and self.pin == other.pin)

    def _read(self, i: int):
        tensors = self.adapter.read_layer(self.model, i, self.pin)
        if self.device is None or tensors is None:
            return tensors
        try:
            if self._stream is None:
                return self.adapter.place_layer(self.model, tensors, self.device)
            with torch.cuda.stream(self._stream):
                placed = self.adapter.place_layer(self.model, tensors, self.device)
            self._stream.synchronize()      # the copies are done before the main stream reads them
            return placed
        except torch.OutOfMemoryError:
            # no room beside the current layer's peak: the host tensors, copied by install_layer at the layer's
            # turn as without the copy ahead (the partial copy is freed with this frame)
            return tensors

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
