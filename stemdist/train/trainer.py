"""One cycle's training: the sharded loader and a Lightning Trainer (DDP when there are several ranks)."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytorch_lightning as pl
import torch
import zarr
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from .. import console, faults
from ..config import Config, TrainConfig
from ..data.dataset import NeighbourPatches, split_group
from ..data.tiles import Grid, holdout_positions
from ..errors import InputError
from ..layout import RunPaths, append_loss, cycle_name, member_name
from .module import Denoiser, warmup_epochs

if TYPE_CHECKING:  # the run stage decides the hardware and the ranks; training only receives them
    from ..run.ranks import Ranks

log = logging.getLogger("stemdist")


def _worker_init(_: int) -> None:
    """One codec thread per loader worker: N workers x M threads would oversubscribe the CPU."""
    from numcodecs import blosc

    blosc.set_nthreads(1)
    torch.set_num_threads(1)


class Batches:
    """The training batches as Lightning sees them: each tile group from the DataLoader is copied to the
    device once (pinned, non-blocking) and split there (:func:`stemdist.dataset.split_group`)."""

    def __init__(self, groups: DataLoader, n_batches: int, device: Callable[[], torch.device] | None = None):
        self.groups, self.n_batches = groups, n_batches
        self.dataset = groups.dataset
        self.device = device or (lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in self.groups:
            device = self.device()
            yield from split_group(tuple(t.to(device, non_blocking=True) for t in group[:3]))
            self.dataset.release(group)  # its batches are made (on the device, or copied out on a CPU)

    def close(self) -> None:
        """Stop the persistent loader workers (and the pinning thread) now. Lightning stops each epoch after
        ``len`` batches, so the DataLoader's iterator is never exhausted and would live until interpreter
        exit, where tearing down workers that hold shared ring buffers can wait indefinitely."""
        it = getattr(self.groups, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.groups._iterator = None


def loader(dataset: NeighbourPatches, config: Config, device: Callable[[], torch.device] | None = None,
           pin_memory: bool = False) -> Batches:
    """The sharded dataset's groups through a DataLoader (workers, pinned memory), split into batches on
    ``device()`` (asked at each group: the module's device once Lightning has placed it)."""
    workers = config.data.num_workers
    groups = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=config.data.prefetch_factor if workers else None)
    return Batches(groups, len(dataset), device)


class LossLog(Callback):
    """Appends one row per epoch to the run's loss log (cycle, epoch, phase, loss, ..., ensemble member):
    survives resumes."""

    def __init__(self, path: Path, cycle: int, member: int = 0):
        self.path, self.cycle, self.member, self.t0 = path, cycle, member, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        faults.point(f"train:{self.cycle}:{trainer.current_epoch}" + (f":member{self.member}" if self.member else ""))
        if trainer.global_rank != 0 or "loss_epoch" not in trainer.callback_metrics:
            return
        append_loss(self.path, {"cycle": self.cycle, "epoch": trainer.current_epoch,
                                "phase": "warmup" if module.in_warmup() else "poisson",
                                "loss": f"{float(trainer.callback_metrics['loss_epoch']):.6g}",
                                "seconds": f"{time.perf_counter() - self.t0:.3f}",
                                "grad_norm": f"{float(trainer.callback_metrics.get('grad_norm', math.nan)):.4g}",
                                "heldout": f"{float(trainer.callback_metrics.get('heldout', math.nan)):.6g}",
                                "member": self.member})


MANY_PASSES = 60  # more passes than this over a scan's positions get a line in the log (README: passes)


def min_samples_epochs(train: TrainConfig, samples_per_epoch: int) -> int:
    """The epochs that hold ``train.min_samples`` samples, uncapped."""
    return math.ceil(train.min_samples / max(samples_per_epoch, 1))


def cycle_epochs(train: TrainConfig, samples_per_epoch: int) -> int:
    """The epochs a cycle runs: ``train.epochs``, or more where ``train.min_samples`` asks for more samples than
    they hold, those at most ``train.max_epochs``."""
    wanted = min_samples_epochs(train, samples_per_epoch)
    if train.max_epochs is not None:
        wanted = min(wanted, train.max_epochs)
    return max(train.epochs, wanted)


AVERAGE_STEPS = 128  # optimiser steps between two of the networks averaged, at least (train.average_every: auto)


def average_every(train: TrainConfig, batches: int) -> int:
    """Epochs between two of the ``train.average_epochs`` networks inference averages: ``train.average_every``,
    or (auto) enough that :data:`AVERAGE_STEPS` optimiser steps (``batches`` per epoch) lie between them; at most
    as many as leave all of them within the Poisson phase."""
    want = train.average_every
    if want == "auto":
        want = math.ceil(AVERAGE_STEPS / max(batches, 1))
    room = (train.epochs - warmup_epochs(train)) // max(train.average_epochs, 1)
    return max(1, min(want, room))


class EpochSnapshots(Callback):
    """The networks inference uses: their weights (on the CPU) at the end of ``keep`` Poisson epochs, the last
    one and every ``every``-th before it, or with ``select`` those with the lowest Poisson loss on the held-out
    positions (``train.holdout``; Lightning's validation runs before ``on_train_epoch_end``). Kept in the
    checkpoint, so a resumed cycle uses the same networks."""

    def __init__(self, keep: int, select: bool = False, every: int = 1):
        self.keep, self.select, self.every = keep, select, every
        self.members: list[dict] = []
        self.epochs: list[int] = []
        self.scores: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if module.in_warmup():  # the warm-up's network predicts z-scores, not counts
            return
        if not self.select and (trainer.max_epochs - 1 - trainer.current_epoch) % self.every:
            return
        score = math.nan
        if self.select:  # rank 0's (synced over ranks already): every rank must keep the same networks
            score = trainer.strategy.broadcast(float(trainer.callback_metrics.get("heldout", math.nan)))
        self.members.append({k: v.detach().to("cpu", copy=True) for k, v in module.net.state_dict().items()})
        self.epochs.append(trainer.current_epoch)
        self.scores.append(score)
        if self.select:  # lowest held-out loss first, the later epoch on a tie (or where none was logged)
            keep = sorted(np.lexsort((-np.asarray(self.epochs), np.nan_to_num(self.scores, nan=np.inf)))[:self.keep])
        else:
            keep = range(len(self.members))[-self.keep:]
        self.members, self.epochs, self.scores = ([v[i] for i in keep] for v in (self.members, self.epochs,
                                                                                  self.scores))

    def state_dict(self) -> dict:
        return {"members": self.members, "epochs": self.epochs, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.members = list(state.get("members", []))
        self.epochs = list(state.get("epochs", [-1] * len(self.members)))
        self.scores = list(state.get("scores", [math.nan] * len(self.members)))


def loggers(paths: RunPaths, cycle: int, member: int = 0) -> list:
    name, folder = cycle_name(cycle), member_name(member)  # an ensemble's later members log in their own folders

    def version(attempt: int) -> str:
        return "/".join(p for p in (folder, f"resumed_{attempt}" if attempt else "") if p)

    attempt = 0  # a resumed cycle logs beside its first attempt, never over it
    while (paths.logs / name / version(attempt) / "metrics.csv").exists():
        attempt += 1
    out = [CSVLogger(paths.logs, name=name, version=version(attempt))]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        out.append(TensorBoardLogger(paths.logs, name="tensorboard",
                                     version="_".join(p for p in (name, folder) if p)))
    except ImportError:
        pass
    return out


def averaging(config: Config, steps_per_epoch: int) -> list[Callback]:
    """``train.ema``: Lightning's moving average of the weights, from the first Poisson step on (the warm-up's
    weights predict z-scores, not counts); checkpoints hold both, and the average replaces the weights when
    the cycle's training ends."""
    if not config.train.ema:
        return []
    return [EMAWeightAveraging(decay=config.train.ema, use_buffers=True,
                               update_starting_at_step=warmup_epochs(config.train) * steps_per_epoch)]


def trainer(config: Config, ranks: Ranks, paths: RunPaths, cycle: int, accelerator: str,
            precision: str, steps_per_epoch: int, snapshots: EpochSnapshots | None = None,
            validate: bool = False, member: int = 0) -> pl.Trainer:
    """Lightning's Trainer for one cycle of one ensemble ``member`` (DDP over the ranks when there are several);
    ``snapshots`` keeps the networks that inference averages; ``validate``: the held-out loss after every
    epoch."""
    console.quiet_libraries()
    devices, num_nodes = (ranks.local_world_size, ranks.num_nodes) if ranks.world_size > 1 else (1, 1)
    strategy = config.hardware.strategy
    if strategy == "auto" and ranks.world_size > 1:
        strategy = "ddp"
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        max_epochs=config.train.epochs,
        gradient_clip_val=config.train.grad_clip or None,
        gradient_clip_algorithm="norm",
        logger=loggers(paths, cycle, member),
        callbacks=[
            # one checkpoint, overwritten every epoch: what --resume continues from
            ModelCheckpoint(dirpath=paths.checkpoints(cycle, member), filename="last", monitor=None, save_top_k=1,
                            every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False),
            LossLog(paths.losses, cycle, member),
            *averaging(config, steps_per_epoch),
            *([snapshots] if snapshots is not None else []),
        ],
        use_distributed_sampler=False,
        enable_progress_bar=console.enabled(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        check_val_every_n_epoch=1,
        log_every_n_steps=10,
        default_root_dir=paths.root,
    )


def train_cycle(module: Denoiser, config: Config, ranks: Ranks, paths: RunPaths, cycle: int, raw: str,
                den: str | None, beta: float, accelerator: str = "cpu", precision: str = "32-true",
                member: int = 0, fold: np.ndarray | None = None) -> list[dict]:
    """Train ``module`` (``train.ensemble`` or ``train.crossfit`` member ``member``, its seed in ``config``) for
    one cycle on ``(1 - beta) raw + beta den``, resuming from its last checkpoint; ``fold``: flat scan indices
    that are never targets (its cross-fitting fold). Returns the state dicts of the networks whose outputs
    inference averages (``train.average_epochs``; empty for 1: the module's own weights)."""
    c = config
    label = f"cycle {cycle}" + (f" member {member}" if member else "")  # for the log
    common = dict(batch_size=c.train.batch_size, borders=c.data.borders, shuffle_tiles=c.data.shuffle_tiles,
                  cache_chunks=c.data.cache_chunks, seed=c.train.seed, cycle=cycle, rank=ranks.rank,
                  world_size=ranks.world_size, halo=c.model.halo)
    grid = Grid.of(zarr.open_array(raw, mode="r"), c.model.halo)
    holdout = holdout_positions(grid, c.data.borders, c.train.holdout, c.train.seed)
    dataset = NeighbourPatches(raw, den, beta, target=c.train.target, num_workers=c.data.num_workers,
                               prefetch_factor=c.data.prefetch_factor,
                               holdout=holdout if fold is None else fold, **common)
    # scored each epoch: the held-out positions, or the fold a cross-fitting network never has as targets
    scored = holdout if fold is None else fold
    if len(scored):
        # the fewest batches per rank, each as small as it can be: fewer than one repeated sample per batch
        batches = math.ceil(len(scored) / (ranks.world_size * c.train.batch_size))
        common["batch_size"] = math.ceil(len(scored) / (ranks.world_size * batches))
        # scored against the raw counts: a blend's targets would carry the network's own earlier output
        heldout = NeighbourPatches(raw, den, beta, target="raw", holdout=scored, heldout=True, **common)
    plan = dataset.plan(0)
    epochs = cycle_epochs(c.train, plan.total)
    if epochs != c.train.epochs and ranks.is_main:
        wanted = min_samples_epochs(c.train, plan.total)
        if epochs < wanted:
            log.info("%s: %d epochs instead of train.epochs %d (train.max_epochs; train.min_samples %d would make "
                     "it %d over %d positions)", label, epochs, c.train.epochs, c.train.min_samples, wanted,
                     plan.total)
        else:
            log.info("%s: %d epochs instead of train.epochs %d, so that it sees train.min_samples %d samples%s",
                     label, epochs, c.train.epochs, c.train.min_samples,
                     f" ({epochs} passes over each of {plan.total} positions: a network can learn so small a scan's "
                     f"noise by heart; train.max_epochs caps them)" if epochs > MANY_PASSES else "")
    if epochs != c.train.epochs:
        c = config = c.model_copy(update={"train": c.train.model_copy(update={"epochs": epochs})})
    module.train_cfg = c.train
    if ranks.is_main and warmup_epochs(c.train) < c.train.warmup_epochs:
        log.info("%s: warm-up shortened from %d to %d of %d epochs, so that training ends on the Poisson "
                 "loss", label, c.train.warmup_epochs, warmup_epochs(c.train), c.train.epochs)
    if ranks.is_main:
        log.info("%s: blend beta %.3f, %d samples per epoch, %d batches of %d per rank, %d repeated samples "
                 "to even out %d shards", label, beta if den else 0.0, plan.total, len(dataset), c.train.batch_size,
                 plan.repeats, dataset.n_shards)
        if fold is not None:
            log.info("%s: %d probe positions of fold %d left out (train.crossfit %d): never its targets, and only it "
                     "predicts them; their Poisson loss is logged each epoch (heldout)", label, len(fold), member,
                     c.train.crossfit)
        if len(holdout):
            log.info("%s: %d probe positions held out (train.holdout %g): never targets, their Poisson loss "
                     "picks the networks used", label, len(holdout), c.train.holdout)
    ckpt = paths.checkpoints(cycle, member) / "last.ckpt"
    if ckpt.exists():
        try:
            torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as exc:  # torn by a kill or a full disk
            raise InputError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}); delete it and --resume again: "
                             f"cycle {cycle} then restarts from its first epoch") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
        warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")  # validation runs with train.holdout only
        batches = loader(dataset, config, lambda: module.device, pin_memory=accelerator == "gpu")
        val = loader(heldout, config.model_copy(update={"data": c.data.model_copy(update={"num_workers": 0})}),
                     lambda: module.device) if len(scored) else None
        select = len(holdout) > 0 and not c.train.ema  # a cross-fitting fold is scored, never used to select
        keep = c.train.average_epochs > 1 or select
        every = average_every(c.train, len(dataset))
        snapshots = EpochSnapshots(c.train.average_epochs, select, every) if keep else None
        if ranks.is_main and keep and not select and every > 1:
            log.info("%s: inference averages networks %d epochs apart, back from the last (%d batches per epoch; "
                     "train.average_every)", label, every, len(dataset))
        fit = trainer(config, ranks, paths, cycle, accelerator, precision, len(dataset), snapshots, val is not None,
                      member)
        try:
            fit.fit(module, train_dataloaders=batches, val_dataloaders=val,
                    ckpt_path=str(ckpt) if ckpt.exists() else None)
        finally:
            batches.close()
    if ranks.is_main and fold is not None:
        scores = {k: float(fit.callback_metrics.get(k, math.nan)) for k in ("heldout", "loss_epoch")}
        log.info("%s: last epoch's Poisson loss %.6g on fold %d (never its targets), %.6g on its targets (during the "
                 "epoch); the first far above the second: it learned its targets' noise", label, scores["heldout"],
                 member, scores["loss_epoch"])
    if snapshots is None:
        return []
    if ranks.is_main and select:
        log.info("%s: the networks used are those of epochs %s (held-out loss %s)", label,
                 ", ".join(str(e + 1) for e in snapshots.epochs), ", ".join(f"{v:.6g}" for v in snapshots.scores))
    if len(snapshots.members) == 1:  # the one network used: the module's own weights from here on
        module.net.load_state_dict(snapshots.members[0])
        return []
    return snapshots.members
