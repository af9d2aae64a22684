"""A CUDA accelerator that keeps PyTorch's memory cache between `trainer.predict` calls.

Lightning's CUDAAccelerator empties the caching allocator and drops cuBLAS's workspaces in
both `setup` and `teardown`, i.e. twice per `trainer.predict`. The layer walk makes one
predict call per pass (five or more per decoder layer), so every pass gave its activation
buffers back to the driver (`cudaFree`, which synchronises the device) and allocated them
again (`cudaMalloc`), and cuBLAS rebuilt its workspace on the next matmul. Keeping the cache
is what a long-lived inference process does anyway; memory is returned once, at the end of
the run (`release_cached_memory`).
"""
from __future__ import annotations

import torch
from lightning.pytorch.accelerators import CUDAAccelerator


class CachedCUDAAccelerator(CUDAAccelerator):
    """CUDAAccelerator whose setup/teardown leave the CUDA caching allocator alone."""

    def setup(self, trainer) -> None:
        self.set_nvidia_flags(trainer.local_rank)      # what the parent does, minus emptying the cache

    def teardown(self) -> None:
        pass


def trainer_accelerator(name: str):
    """What to pass as `L.Trainer(accelerator=...)` for config value `name` (auto/cpu/gpu/cuda)."""
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return CachedCUDAAccelerator()
    return name


def release_cached_memory() -> None:
    """Give the cached CUDA memory back once the walk is over (what Lightning did after every pass)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
