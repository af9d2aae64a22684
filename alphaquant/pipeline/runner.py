"""The LightningModule: runs ONE decoder layer (or the LM head) over cached inputs.

No model weights are registered on this module, not even the block being run: Lightning
moves a LightningModule's registered parameters back to the CPU at the end of every predict
call (Strategy.teardown), which for an MoE decoder layer (~1 GB) meant a round trip over
PCIe per pass and a host-side checkpoint write. The walker (`walker.py`) places each block
on the accelerator once, swaps it in between `trainer.predict` calls and sets what a pass does:

- phase "collect":   run the layer; callbacks hook the inputs of one true-sequential
                     group of linears and accumulate Hessians; outputs are dropped. With
                     `plan.fp_block` (gptq.asymmetric) the unquantized copy of the layer runs first
                     on the same batch of `plan.fp_stream`, so hooks pair each linear's fp-model
                     input with its quantized-model input, token by token.
- phase "propagate": run the layer and store its outputs as the next layer's inputs.
- phase "head":      run final norm + lm_head and return logits for the perplexity callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import lightning as L
import torch
from torch import nn

from alphaquant.pipeline.stores import SampleStore


@dataclass
class PassPlan:
    """What the current predict pass does; callbacks read it from `runner.plan`."""

    phase: str                      # "collect" | "propagate" | "head"
    stream: str                     # which SampleStore: "calib", "eval_fp", "eval_q", ...
    layer_index: int = -1
    group_index: int = -1
    group: list[str] = field(default_factory=list)   # linear names (relative to the layer) to calibrate
    fp_block: nn.Module | None = None   # collect with gptq.asymmetric: the layer's unquantized copy ...
    fp_stream: str | None = None        # ... and the stream of the fp model's layer inputs it runs on


class LayerRunner(L.LightningModule):
    def __init__(self, layer_kwargs: Callable[[torch.Tensor], dict]):
        super().__init__()
        self.block: nn.Module | None = None          # deliberately not a registered submodule (see above)
        self.layer_kwargs = layer_kwargs             # hidden [B, T, H] -> kwargs for layer(...)
        self.stores: dict[str, SampleStore] = {}
        self.plan = PassPlan("propagate", "calib")

    def set_block(self, block: nn.Module, plan: PassPlan) -> None:
        self.__dict__["block"] = block     # bypasses nn.Module.__setattr__, which would register it
        self.plan = plan

    @torch.no_grad()
    def predict_step(self, batch: torch.Tensor, batch_idx: int):
        store = self.stores[self.plan.stream]
        idx = batch                                               # [B] sample indices
        hidden = store.get(idx, self.device)                      # [B, T, H]
        if self.plan.phase == "head":
            return {"idx": idx, "logits": self.block(hidden)}     # [B, T, V]
        if self.plan.phase == "collect" and self.plan.fp_block is not None:
            hidden_fp = self.stores[self.plan.fp_stream].get(idx, self.device)   # same samples, fp model
            self.plan.fp_block(hidden_fp, **self.layer_kwargs(hidden_fp))      # hooks keep its inputs
        out = self.block(hidden, **self.layer_kwargs(hidden))     # [B, T, H]
        if self.plan.phase == "propagate":
            store.put(idx, out)
        return {"idx": idx}
