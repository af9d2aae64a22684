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
    """

    def __init__(self, tokens: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str | None = None):
        self.tokens = tokens          # [N, T] long
        self.embed = embed            # [B, T] long (host) -> [B, T, H]
        self.device = torch.device(device) if device is not None else None
        self.hidden: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def get(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Hidden states of a batch of sample indices, stacked [B, T, H] on `device`."""
        ids = [int(i) for i in idx]
        missing = [i for i in ids if i not in self.hidden]
        if missing and len(missing) != len(ids):
            raise RuntimeError("sample store holds part of a batch; batches must stay fixed across passes")
        if missing:
            return self.embed(self.tokens[ids]).to(device)   # embeddings stay where the model is
        return torch.stack([self.hidden[i] for i in ids]).to(device, non_blocking=True)

    def put(self, idx: torch.Tensor, hidden: torch.Tensor) -> None:
        """Store a batch of layer outputs [B, T, H] as the next layer's inputs."""
        target = self.device or hidden.device
        for i, h in zip(idx.tolist(), hidden.detach()):
            # A row of a contiguous batch is contiguous; it shares the batch storage, all of which is kept.
            self.hidden[int(i)] = h.to(target, non_blocking=True)

    def token_ids(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.tokens[[int(i) for i in idx]].to(device)
