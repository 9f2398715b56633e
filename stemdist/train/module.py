"""LightningModule: the U-Net with the reference's warm-up, Poisson loss and Adam optimiser."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from ..config import ModelConfig, TrainConfig
from .losses import poisson_loss, warmup_loss
from .model import UNet


class Denoiser(pl.LightningModule):
    def __init__(self, model: ModelConfig, train: TrainConfig, channels_last: bool = False):
        super().__init__()
        self.net = UNet(8, model.base_width, model.depth)
        self.train_cfg = train
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        object.__setattr__(self, "_forward", self.net)  # not a submodule: state dicts stay plain

    def compile_net(self) -> None:
        object.__setattr__(self, "_forward", torch.compile(self.net))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def in_warmup(self) -> bool:
        return self.current_epoch < self.train_cfg.warmup_epochs

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self(x).float()
        if self.in_warmup():
            loss = warmup_loss(pred, y)
        else:
            loss = poisson_loss(pred, y, self.train_cfg.mean_weight, self.train_cfg.sum_weight)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(x))
        return loss

    def on_train_epoch_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        self.log("warmup", float(self.in_warmup()), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.train_cfg.lr)
