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

`plan.reuse` (attention_reuse.py): a collect or propagate pass may start part-way from a cache an earlier pass
of the same layer filled, and may fill caches through pre-hooks on the modules whose inputs they hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import lightning as L
import torch
from torch import nn

from alphaquant.pipeline.attention_reuse import ACT, H, PassReuse
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
    reuse: PassReuse = field(default_factory=PassReuse)   # attention reuse: a cache to start from, caches to fill


class LayerRunner(L.LightningModule):
    def __init__(self, layer_kwargs: Callable[[torch.Tensor], dict]):
        super().__init__()
        self.block: nn.Module | None = None          # deliberately not a registered submodule (see above)
        self.layer_kwargs = layer_kwargs             # hidden [B, T, H] -> kwargs for layer(...)
        self.stores: dict[str, SampleStore] = {}
        self.plan = PassPlan("propagate", "calib")
        self.seen: set[int] = set()                  # sample indices of the pass so far
        self._idx: torch.Tensor | None = None
        self._capture_handles: list = []
        self.captured: dict[str, set[int]] = {}      # attention reuse: cache -> samples it got in this pass

    def set_block(self, block: nn.Module, plan: PassPlan) -> None:
        self.__dict__["block"] = block     # bypasses nn.Module.__setattr__, which would register it
        self.plan = plan
        self.seen, self.captured = set(), {}
        self.end_pass()
        for cache, module in plan.reuse.capture:
            # prepended: runs before a collector pre-hook on the same module that stops the forward there
            self._capture_handles.append(block.get_submodule(module).register_forward_pre_hook(
                self._capturer(cache), prepend=True, with_kwargs=True))

    def end_pass(self) -> None:
        """Remove the pass's capture hooks (the walker calls this after each trainer.predict)."""
        for h in self._capture_handles:
            h.remove()
        self._capture_handles = []

    def _capturer(self, cache: str):
        def pre(_mod, args, kwargs):
            if cache == ACT:        # expert_act(h, route=...): the down inputs and the routing that sorted them
                if kwargs.get("route") is None:
                    return None     # not the grouped path's call: nothing captured, the cache stays incomplete
                self.stores[cache].put(self._idx, args[0], kwargs["route"])
            else:
                self.stores[cache].put(self._idx, args[0])
            self.captured.setdefault(cache, set()).update(self._idx.tolist())
            return None
        return pre

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """A batch is sample indices: they stay on the host. Every use of them is host-side (store lookups, the
        sets of samples seen and captured); moved to the GPU (Lightning's default) each int() of them was a
        device sync inside the layer's forward, three per batch, each draining the GPU's queue."""
        return batch

    @torch.no_grad()
    def predict_step(self, batch: torch.Tensor, batch_idx: int):
        store = self.stores[self.plan.stream]
        idx = batch                                               # [B] sample indices
        self._idx = idx
        self.seen.update(idx.tolist())                            # one call, not an item() per sample
        reuse = self.plan.reuse
        if reuse.resume == "down":          # h and the MoE block's down inputs from an earlier pass
            hidden = self.stores[H].get(idx, self.device)
            kwargs = {"resume": "down", "resume_input": self.stores[ACT].pop(idx)}
        elif reuse.resume == "mlp":         # h = x + attn(norm(x)) from an earlier pass: the layer input is not read
            hidden = self.stores[reuse.resume_from].get(idx, self.device)
            kwargs = {"resume": "mlp"}
        else:
            hidden = store.get(idx, self.device)                  # [B, T, H]
            if self.plan.phase == "head":
                return {"idx": idx, "logits": self.block(hidden)}     # [B, T, V]
            kwargs = self.layer_kwargs(hidden)
            if reuse.resume == "o_proj":
                kwargs = {**kwargs, "resume": "o_proj", "resume_input": self.stores[reuse.resume_from].get(idx, self.device)}
        if self.plan.phase == "collect" and self.plan.fp_block is not None:
            hidden_fp = self.stores[self.plan.fp_stream].get(idx, self.device)   # same samples, fp model
            self.plan.fp_block(hidden_fp, **self.layer_kwargs(hidden_fp))      # hooks keep its inputs
        out = self.block(hidden, **kwargs)                        # [B, T, H]
        if reuse.supersedes:
            self.stores[reuse.supersedes].drop(idx)               # superseded by the cache captured from it
        if self.plan.phase == "propagate":
            store.put(idx, out)
        return {"idx": idx}
