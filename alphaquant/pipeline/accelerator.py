"""Keeping PyTorch's CUDA memory cache between `trainer.predict` calls.

Lightning's CUDAAccelerator empties the caching allocator and drops cuBLAS's workspaces in
both `setup` and `teardown`, and its checkpoint connector empties the allocator once more at
the start of every run (`resume_end`, even with no checkpoint to resume): three times per
`trainer.predict`. The layer walk makes one
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


def keep_cache_on_resume_end(trainer) -> None:
    """Make the trainer's `resume_end` skip its `torch.cuda.empty_cache()` when there is no checkpoint
    to resume (always, for predict passes). Everything else it does (the barrier) is kept. Lightning's
    private connector: if a release renames it, nothing is patched and only speed is lost."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    original = getattr(connector, "resume_end", None)
    if original is None:
        return

    def resume_end() -> None:
        if connector._ckpt_path:
            original()
            return
        connector._loaded_checkpoint = {}
        trainer.strategy.barrier("_CheckpointConnector.resume_end")
    connector.resume_end = resume_end


def trainer_accelerator(name: str):
    """What to pass as `L.Trainer(accelerator=...)` for config value `name` (auto/cpu/gpu/cuda)."""
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return CachedCUDAAccelerator()
    return name


def release_cached_memory() -> None:
    """Give the cached CUDA memory back once the walk is over (what Lightning did after every pass)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
