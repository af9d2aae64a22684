"""Perplexity of an evaluation stream through torchmetrics, fed by the head pass.

The head pass returns logits per batch; the metric compares logits[:, :-1] with the
window's tokens[:, 1:] (GPTQ convention: non-overlapping windows, mean token
cross-entropy, ppl = exp of it). compute() syncs the metric state across DDP ranks.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from torchmetrics.text import Perplexity


class PerplexityCallback(Callback):
    def __init__(self):
        self.results: dict[str, float] = {}     # stream name -> perplexity
        self._metric = None

    def on_predict_start(self, trainer, runner):
        if runner.plan.phase == "head":
            self._metric = Perplexity().to(runner.device)

    def on_predict_batch_end(self, trainer, runner, outputs, batch, batch_idx, dataloader_idx=0):
        if runner.plan.phase != "head":
            return
        tokens = runner.stores[runner.plan.stream].token_ids(outputs["idx"], runner.device)   # [B, T]
        self._metric.update(outputs["logits"][:, :-1].float(), tokens[:, 1:])

    def on_predict_end(self, trainer, runner):
        if runner.plan.phase == "head":
            self.results[runner.plan.stream] = float(self._metric.compute())
            self._metric = None
