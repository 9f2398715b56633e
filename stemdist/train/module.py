"""LightningModule: the U-Net with the reference's warm-up, Poisson loss and Adam optimiser."""

from __future__ import annotations

import copy
import math

import pytorch_lightning as pl
import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..data.tiles import neighbour_offsets
from .losses import pixel_weights, poisson_loss, poisson_nll, warmup_loss
from .model import UNet
from .symmetry import ELEMENTS, Augment, augment, draw, element_of, move_window, moved_back, transform_patterns

UNRESOLVED = "{} 'auto' must be resolved first (stemdist.config.resolve_auto, from the cube's counts per pattern)"


def warmup_epochs(train: TrainConfig) -> int:
    """Warm-up epochs actually run: at most half the cycle's epochs, so that every schedule ends on the
    Poisson loss, whose output is in counts (the z-normalised warm-up leaves the scale free)."""
    if train.warmup_epochs == "auto":
        raise ValueError(UNRESOLVED.format("train.warmup_epochs"))
    return min(train.warmup_epochs, train.epochs // 2)


class Denoiser(pl.LightningModule):
    def __init__(self, model: ModelConfig, train: TrainConfig, channels_last: bool = False):
        super().__init__()
        if model.base_width == "auto":
            raise ValueError(UNRESOLVED.format("model.base_width"))
        self.net = UNet(len(neighbour_offsets(model.halo)), model.base_width, model.depth, model.head,
                        mean_channel=model.mean_channel, centre=model.centre > 0)
        self.centre = model.centre
        self.train_cfg = train
        self.halo = model.halo
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        object.__setattr__(self, "_forward", self.net)  # not a submodule: state dicts stay plain
        self.counts_matched = False  # whether this cycle's Poisson phase has put the output in counts

    def compile_net(self) -> None:
        object.__setattr__(self, "_forward", torch.compile(self.net))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def in_warmup(self) -> bool:
        return self.current_epoch < warmup_epochs(self.train_cfg)

    def thin(self, x: torch.Tensor, y: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``model.centre`` p: the input gains the centre's thinned counts ``y1 / p`` (``y1`` a binomial
        p-share of ``y``, drawn from the step, rank and seed) and the target becomes ``(y - y1) / (1 - p)``: an
        independent Poisson draw of the same rates, so the network cannot learn to copy its input's noise."""
        p = self.centre
        if not p:
            return x, y
        gen = torch.Generator(device=y.device)
        gen.manual_seed(hash((self.train_cfg.seed, self.global_step, self.global_rank, salt)) % 2**62)
        counts = y.float().clamp(min=0).round()
        y1 = torch.binomial(counts, torch.full_like(counts, p), generator=gen)
        return torch.cat([x, (y1 / p).to(x.dtype)], dim=1), ((counts - y1) / (1 - p)).to(y.dtype)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        mode = self.train_cfg.augment
        moved = ELEMENTS[0]  # the identity: no draw in the hot path unless augmenting
        if mode != "none":
            moved = element_of(mode, x.shape, draw(self.train_cfg.seed, self.global_step, self.global_rank))
            x, y = augment(x, y, mode, self.halo, moved)
        x, y = self.thin(x, y, 0)
        if not self.in_warmup() and self.train_cfg.match_counts and not self.counts_matched:
            self.match_counts(x, y)
        pred = self(x).float()
        if self.in_warmup():
            loss = warmup_loss(pred, y)
        else:
            weight = None
            if self.train_cfg.relative_weight:
                weight = pixel_weights(self.net.mean_pattern, self.train_cfg.relative_weight)
                if mode == "joint":  # the target's pixels moved
                    weight = transform_patterns(weight, moved)
            loss = poisson_loss(pred, y, self.train_cfg.mean_weight, self.train_cfg.sum_weight, weight)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The Poisson NLL on held-out positions (``train.holdout``): never targets, so memorised noise does
        not lower it. Not logged in the warm-up, whose output is z-scores."""
        if self.in_warmup():
            return
        x, y = self.thin(*batch, 1 + batch_idx)
        self.log("heldout", poisson_nll(self(x).float(), y), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(x))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient's global norm before any clipping (``grad_norm``: the epoch's largest)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("grad_norm", norm, on_step=False, on_epoch=True, reduce_fx="max", sync_dist=True)

    @torch.no_grad()
    def match_counts(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Put the output in counts before the first Poisson step: scale the head so the batch's mean
        prediction equals its mean target (the output is squared, so by the square root of the ratio;
        averaged over ranks; the ``mean_exp`` head's bias moves by its log). The z-normalised warm-up leaves
        the scale free, and a few Poisson epochs cannot move it by the orders of magnitude that may be needed."""
        ratio = y.float().mean() / self(x).float().mean().clamp(min=1e-12)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ratio)
            ratio /= torch.distributed.get_world_size()
        if torch.isfinite(ratio) and ratio > 0:
            head = self.net.head
            if self.net.head_kind == "mean_exp":  # output = m · exp(head)
                head.bias.add_(ratio.log())
            else:  # output = head ** 2
                head.weight.mul_(ratio.sqrt())
                head.bias.mul_(ratio.sqrt())
        self.counts_matched = True

    def on_train_start(self) -> None:
        self.counts_matched = not self.in_warmup() and self.counts_matched

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["counts_matched"] = self.counts_matched

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.counts_matched = bool(checkpoint.get("counts_matched", False))

    def on_train_epoch_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        self.log("warmup", float(self.in_warmup()), on_step=False, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.train_cfg.lr)
        if self.train_cfg.lr_schedule == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        start = total * warmup_epochs(self.train_cfg) // max(self.trainer.max_epochs, 1)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, start, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


LR_FLOOR = 0.05  # the cosine schedule ends at this fraction of train.lr


def cosine_factor(step: int, start: int, total: int) -> float:
    """The learning rate's factor at optimiser ``step``: 1 until ``start`` (the warm-up), then a half cosine
    down to :data:`LR_FLOOR` at ``total``."""
    if step < start or total <= start:
        return 1.0
    t = min(1.0, (step - start) / (total - start))
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * t))


class OutputAverage(nn.Module):
    """The mean of several networks' outputs (``train.average_epochs``): the networks at the end of a cycle's
    last Poisson epochs. Each one's counts scatter by up to ~10% from epoch to epoch at a constant learning
    rate; their mean does not, where averaging the *weights* would lower the counts (the output is squared).
    Networks trained on moved samples (``train.augment``) each see the window moved another way (member ``k``:
    element ``k`` of the group), their outputs moved back: more views at no extra cost."""

    def __init__(self, members: list[nn.Module], channels_last: bool = False, augment: Augment = "none",
                 halo: int = 1):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.channels_last = channels_last
        self.augment, self.halo = augment, halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for k, member in enumerate(self.members):
            element = element_of(self.augment, x.shape, k)
            xk = move_window(x, self.augment, self.halo, element)
            if self.channels_last:
                xk = xk.contiguous(memory_format=torch.channels_last)
            yk = moved_back(member(xk).float(), self.augment, element)
            out = yk if out is None else out + yk
        return out / len(self.members)


def averaged(module: Denoiser, members: list[dict]) -> nn.Module:
    """What inference runs: ``module`` itself for one member or none (the one member is the weights it holds),
    else the :class:`OutputAverage` of copies of its network holding each member's weights."""
    if len(members) <= 1:
        return module
    nets = []
    for state in members:
        net = copy.deepcopy(module.net)
        net.load_state_dict(state)
        nets.append(net)
    return OutputAverage(nets, module.channels_last, module.train_cfg.augment, module.halo)


def weights_state(modules: list[Denoiser], members: list[dict], folds: int = 1) -> dict:
    """What a weights file holds: the network's state dict, or with several members ``{"last": the live
    weights (what the next cycle or a resume trains on), "average": the members}``; with several modules
    (``train.ensemble``, ``train.crossfit``) also ``"lasts"``, each one's live weights (``"last"`` is the
    first's), and for cross-fitting ``"folds"``: the members are that many equal groups, fold by fold (``predict``
    on another cube averages them all)."""
    lasts = [m.net.state_dict() for m in modules]
    if len(members) <= 1:
        return lasts[0]
    return {"last": lasts[0], "average": members, **({"lasts": lasts} if len(lasts) > 1 else {}),
            **({"folds": folds} if folds > 1 else {})}


def split_weights(state: dict) -> tuple[dict, list[dict]]:
    """``(last weights, members averaged at inference)`` of a weights file of this version or an earlier one."""
    if "last" in state and "average" in state:
        return state["last"], list(state["average"])
    return state, [state]


def ensemble_lasts(state: dict, n: int) -> list[dict]:
    """The live weights of each of the ``n`` ensemble members (``train.ensemble``) in a weights file."""
    lasts = state.get("lasts") or [split_weights(state)[0]]
    if len(lasts) != n:
        raise ValueError(f"the weights file holds {len(lasts)} ensemble member(s), the run has train.ensemble {n}")
    return list(lasts)
