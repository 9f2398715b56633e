"""One cycle's training: the sharded loader and a Lightning Trainer (DDP when there are several ranks)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from . import progress
from .config import Config
from .dataset import NeighbourPatches, split_group
from .distributed import Ranks
from .module import Denoiser

log = logging.getLogger("stemdist")


def use_cuda(config: Config) -> bool:
    return config.hardware.accelerator != "cpu" and torch.cuda.is_available()


def precision(config: Config) -> str:
    p = config.hardware.precision
    if p == "auto":
        return "bf16-mixed" if use_cuda(config) and torch.cuda.is_bf16_supported() else "32-true"
    return "32-true" if p == "32" else p


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
            yield from split_group(tuple(t.to(device, non_blocking=True) for t in group))


def loader(dataset: NeighbourPatches, config: Config,
           device: Callable[[], torch.device] | None = None) -> Batches:
    """The sharded dataset's groups through a DataLoader (workers, pinned memory), split into batches on
    ``device()`` (asked at each group: the module's device once Lightning has placed it)."""
    workers = config.data.num_workers
    groups = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=use_cuda(config),
                        persistent_workers=workers > 0, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=config.data.prefetch_factor if workers else None)
    return Batches(groups, len(dataset), device)


class LossLog(Callback):
    """Appends one row per epoch to ``logs/losses.csv`` (cycle, epoch, phase, loss): survives resumes."""

    def __init__(self, path: Path, cycle: int):
        self.path, self.cycle, self.t0 = path, cycle, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or "loss_epoch" not in trainer.callback_metrics:
            return
        new = not self.path.exists()
        with open(self.path, "a") as f:
            if new:
                f.write("cycle,epoch,phase,loss,seconds\n")
            phase = "warmup" if module.in_warmup() else "poisson"
            loss = float(trainer.callback_metrics["loss_epoch"])
            f.write(f"{self.cycle},{trainer.current_epoch},{phase},{loss:.6g},{time.perf_counter() - self.t0:.3f}\n")


def loggers(run_dir: Path, cycle: int) -> list:
    name = f"cycle_{cycle:02d}"
    attempt = 0  # a resumed cycle logs beside its first attempt, never over it
    while (run_dir / "logs" / name / (f"resumed_{attempt}" if attempt else "") / "metrics.csv").exists():
        attempt += 1
    out = [CSVLogger(run_dir / "logs", name=name, version=f"resumed_{attempt}" if attempt else "")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        out.append(TensorBoardLogger(run_dir / "logs", name="tensorboard", version=name))
    except ImportError:
        pass
    return out


LOSSES = "losses.csv"


def checkpoint_dir(run_dir: Path, cycle: int) -> Path:
    return run_dir / "checkpoints" / f"cycle_{cycle:02d}"


def trainer(config: Config, ranks: Ranks, run_dir: Path, cycle: int) -> pl.Trainer:
    hw = config.hardware
    devices, num_nodes = (ranks.local_world_size, ranks.num_nodes) if ranks.world_size > 1 else (1, 1)
    strategy = hw.strategy
    if strategy == "auto" and ranks.world_size > 1:
        strategy = "ddp"
    return pl.Trainer(
        accelerator="gpu" if use_cuda(config) else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision(config),
        max_epochs=config.train.epochs,
        logger=loggers(run_dir, cycle),
        callbacks=[
            # one checkpoint, overwritten every epoch: what --resume continues from
            ModelCheckpoint(dirpath=checkpoint_dir(run_dir, cycle), filename="last", monitor=None, save_top_k=1,
                            every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False),
            LossLog(run_dir / "logs" / LOSSES, cycle),
        ],
        use_distributed_sampler=False,
        enable_progress_bar=config.output.progress and progress.enabled(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=run_dir,
    )


def train_cycle(module: Denoiser, config: Config, ranks: Ranks, run_dir: Path, cycle: int, raw: str,
                den: str | None, beta: float) -> None:
    """Train ``module`` for one cycle on ``(1 - beta) raw + beta den``, resuming from its last checkpoint."""
    c = config
    dataset = NeighbourPatches(
        raw, den, beta, batch_size=c.train.batch_size, borders=c.data.borders, target=c.train.target,
        shuffle_tiles=c.data.shuffle_tiles, cache_chunks=c.data.cache_chunks, num_workers=c.data.num_workers,
        seed=c.train.seed, cycle=cycle, rank=ranks.rank, world_size=ranks.world_size)
    plan = dataset.plan(0)
    if ranks.is_main:
        log.info("cycle %d: blend beta %.3f, %d samples per epoch, %d batches of %d per rank, %d repeated samples "
                 "to even out %d shards", cycle, beta if den else 0.0, plan.total, len(dataset), c.train.batch_size,
                 plan.repeats, dataset.n_shards)
    ckpt = checkpoint_dir(run_dir, cycle) / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
        batches = loader(dataset, config, lambda: module.device)
        trainer(config, ranks, run_dir, cycle).fit(module, train_dataloaders=batches,
                                                   ckpt_path=str(ckpt) if ckpt.exists() else None)
