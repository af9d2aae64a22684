"""The LightningDataModule: calibration and evaluation token windows as sample indices.

A predict pass iterates over the indices of one stream; the layer inputs themselves live in
`SampleStore`s on the runner (they change from layer to layer, the indices do not). Under
DDP, Lightning wraps the sampler so each rank gets a fixed, disjoint share of the indices
(`UnrepeatedDistributedSampler`: ranks may get uneven counts), and the same share on every
pass, so each rank's store stays consistent.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader


class WindowDataModule(L.LightningDataModule):
    def __init__(self, windows: dict[str, torch.Tensor], batch_sizes: dict[str, int]):
        super().__init__()
        self.windows = windows            # "calib" / "eval" -> [N, T] long token windows
        self.batch_sizes = batch_sizes    # "calib" / "eval" -> windows per forward
        self.stream = "calib"

    def predict_dataloader(self) -> DataLoader:
        n = self.windows[self.stream].shape[0]
        return DataLoader(torch.arange(n), batch_size=self.batch_sizes[self.stream], shuffle=False)
