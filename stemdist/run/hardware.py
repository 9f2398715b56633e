"""The one place that decides the hardware: CPU or GPU, the device of this rank, precision and autocast."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

from .. import memory
from ..config import Config

if TYPE_CHECKING:
    from .ranks import Ranks

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
AUTOCAST_NAMES = {v: k for k, v in AUTOCAST.items()}


def use_cuda(config: Config) -> bool:
    return config.hardware.accelerator != "cpu" and torch.cuda.is_available()


def accelerator(config: Config) -> str:
    """Lightning's accelerator name."""
    return "gpu" if use_cuda(config) else "cpu"


def precision(config: Config) -> str:
    """Lightning's precision: ``auto`` is bf16-mixed on GPUs with bf16, 32-bit otherwise."""
    p = config.hardware.precision
    if p == "auto":
        return "bf16-mixed" if use_cuda(config) and torch.cuda.is_bf16_supported() else "32-true"
    return "32-true" if p == "32" else p


def device(config: Config, ranks: Ranks) -> torch.device:
    """This rank's device: its local GPU, or the CPU."""
    return torch.device(f"cuda:{ranks.local_rank}") if use_cuda(config) else torch.device("cpu")


def autocast_dtype(config: Config) -> torch.dtype | None:
    """The inference-time autocast type matching training's precision (bf16 or fp16 mixed; None for 32-bit)."""
    return AUTOCAST.get(precision(config))


def autocast(dev: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``dev``, or nothing for ``None``."""
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cuda_flags() -> None:
    """TF32 matmuls and convolutions; cuDNN picks its fastest kernels for our fixed shapes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def setup(config: Config, ranks: Ranks) -> None:
    """Process-wide settings: freed memory returned; TF32 matmuls on GPUs; CPU threads shared among the ranks
    of a node."""
    memory.return_freed_memory()
    if use_cuda(config):
        cuda_flags()
    elif ranks.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))


def io_threads(local_world_size: int = 1) -> int:
    """Reader and writer threads (each) of an inference pass: half this rank's share of the node's cores,
    1 to 4 (Blosc decodes and compresses a chunk per thread, outside the GIL)."""
    return max(1, min(4, (os.cpu_count() or 1) // max(1, local_world_size) // 2))


def channels_last(config: Config) -> bool:
    return config.hardware.channels_last and use_cuda(config)
