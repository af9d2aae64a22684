"""Per-sample storage of decoder-layer inputs between predict passes.

Calibration walks the model one decoder layer at a time. The inputs of layer i for every
sample this rank owns are kept here; a propagation pass replaces them with the layer's
outputs, which are the inputs of layer i+1. Under DDP each rank only ever touches the
sample indices its sampler hands it, so each rank stores only its own share.
"""
from __future__ import annotations

from typing import Callable

import torch


class SampleStore:
    """Hidden states [T, H] per sample index, on `device` (None = where they were made).

    Before the first layer the store holds token ids and `embed` turns a batch of them
    into hidden states on demand, so embeddings never need to exist for all samples at once.

    device "cpu" with layers on a GPU (calibration.cache_device: cpu): a batch of outputs is copied into
    one pinned host buffer, asynchronously on the current stream, and read back to the GPU the same way
    when the same batch comes again (batches are fixed across passes), so the GPU holds one batch of
    inputs and outputs instead of every sample's; the copies are stream-ordered with the kernels that
    produce and consume them, so no synchronisation is needed and the values are the same bits.
    """

    def __init__(self, tokens: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str | None = None):
        self.tokens = tokens          # [N, T] long
        self.embed = embed            # [B, T] long (host) -> [B, T, H]
        self.device = torch.device(device) if device is not None else None
        self.hidden: dict[int, torch.Tensor] = {}
        # sample index -> (pinned batch buffer, the sample indices it holds, event after its copy)
        self._batches: dict[int, tuple[torch.Tensor, tuple[int, ...], object]] = {}

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def get(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Hidden states of a batch of sample indices, stacked [B, T, H] on `device`."""
        ids = idx.tolist()
        missing = [i for i in ids if i not in self.hidden]
        if missing and len(missing) != len(ids):
            raise RuntimeError("sample store holds part of a batch; batches must stay fixed across passes")
        if missing:
            return self.embed(self.tokens[ids]).to(device)   # embeddings stay where the model is
        batch = self._batches.get(ids[0])
        if batch is not None and batch[1] == tuple(ids):     # the very batch that was stored: one copy
            return batch[0].to(device, non_blocking=True)
        for i in ids:                                        # another batching: CPU reads, after the copies
            held = self._batches.get(i)
            if held is not None and held[2] is not None:
                held[2].synchronize()
        return torch.stack([self.hidden[i] for i in ids]).to(device, non_blocking=True)

    def put(self, idx: torch.Tensor, hidden: torch.Tensor) -> None:
        """Store a batch of layer outputs [B, T, H] as the next layer's inputs."""
        target = self.device or hidden.device
        ids = idx.tolist()
        hidden = hidden.detach()
        if target.type == "cpu" and hidden.device.type == "cuda":
            buf = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            buf.copy_(hidden, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            for i, h in zip(ids, buf):
                self.hidden[i] = h
                self._batches[i] = (buf, tuple(ids), event)
            return
        for i, h in zip(ids, hidden):
            # A row of a contiguous batch is contiguous; it shares the batch storage, all of which is kept.
            self.hidden[i] = h.to(target)
            self._batches.pop(i, None)

    def drop(self, idx: torch.Tensor) -> None:
        """Forget these samples (their batch's memory goes once no sample of it is held)."""
        for i in idx.tolist():
            self.hidden.pop(i, None)
            self._batches.pop(i, None)

    def token_ids(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.tokens[idx.tolist()].to(device)

    def cached_devices(self) -> set[torch.device]:
        """Devices the cached hidden states are on (diagnostics and tests)."""
        return {h.device for h in self.hidden.values()}


class BatchStore:
    """Per-batch values (the routed experts' down inputs and their routing, attention_reuse.ACT) kept between two
    passes of one layer that batch the samples alike: `put` under a batch's sample indices, `pop` them back
    once (the memory goes with it). A batch it does not hold is a RuntimeError (batches are fixed across passes)."""

    def __init__(self):
        self.batches: dict[tuple[int, ...], tuple] = {}

    def put(self, idx: torch.Tensor, *values) -> None:
        self.batches[tuple(idx.tolist())] = values

    def pop(self, idx: torch.Tensor) -> tuple:
        key = tuple(idx.tolist())
        if key not in self.batches:
            raise RuntimeError("attention reuse: the down-input cache was read for a batch it does not hold "
                               "(batches must stay fixed across the passes of a layer)")
        return self.batches.pop(key)
