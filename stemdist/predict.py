"""``stemdist predict``: apply trained weights to a cube (one distributed inference pass, no training)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import zarr

from . import config as cfg
from . import distributed, storage
from .errors import InputError
from .inference import infer
from .module import Denoiser
from .progress import bar
from .training import precision, use_cuda

log = logging.getLogger("stemdist")


def _weights_and_config(source: Path) -> tuple[Path, cfg.Config]:
    """A run directory, or a weights file with ``config.yaml`` beside it."""
    weights = source / "unet_denoiser.pt" if source.is_dir() else source
    conf_file = weights.parent / "config.yaml"
    if not weights.exists():
        raise InputError(f"{weights} does not exist (expected a run directory or a weights file)")
    if not conf_file.exists():
        raise InputError(f"{conf_file} not found: the network's shape comes from the run's config.yaml")
    return weights, cfg.load(conf_file)


def predict(source: str | Path, input_path: str | Path, output: str | Path, *, dataset: str | None = None,
            batch_size: int | None = None, accelerator: str | None = None,
            ranks: distributed.Ranks | None = None) -> Path:
    """Denoise ``input_path`` with the weights of ``source`` into the new Zarr array ``output``."""
    ranks = ranks or distributed.detect()
    weights, config = _weights_and_config(Path(source))
    if accelerator:
        config.hardware.accelerator = accelerator
    output = Path(output)
    distributed.init(ranks, use_cuda(config))

    def create() -> str:
        if output.exists():
            raise InputError(f"output {output} already exists; remove it or choose another path")
        raw = storage.open_cube(input_path, dataset)
        storage.check_values(raw, str(input_path))
        tile = raw.chunks[0] if raw.chunks[2:] == raw.shape[2:] else storage.default_tile(raw.shape, 4)
        storage.create_cube(output, None, tuple(raw.shape), tile, attrs={"weights": str(weights.resolve())})
        return str(Path(input_path))

    distributed.run_on_main(create, ranks)
    raw = storage.open_cube(input_path, dataset)
    out = zarr.open_array(str(output), mode="r+")
    module = Denoiser(config.model, config.train)
    module.net.load_state_dict(torch.load(weights, map_location="cpu"))
    device = torch.device(f"cuda:{ranks.local_rank}" if use_cuda(config) else "cpu")
    module.to(device)
    n = -(-raw.shape[0] // out.chunks[0]) * -(-raw.shape[1] // out.chunks[1])
    with bar("inference", n // ranks.world_size, ranks.is_main) as advance:
        infer(module, raw, None, 0.0, out, borders=config.data.borders,
              batch_size=batch_size or config.inference.batch_size, device=device, rank=ranks.rank,
              world_size=ranks.world_size, cache_chunks=config.data.cache_chunks,
              autocast="bf16" if precision(config) == "bf16-mixed" else None, progress=advance)
    distributed.barrier()
    if ranks.is_main:
        storage.mark_complete(out)
    distributed.barrier()
    return output


def cmd_predict(a: argparse.Namespace) -> int:
    ranks = distributed.detect()
    if ranks.launcher == "none" and a.devices and a.devices > 1:
        return distributed.relaunch(a.devices, a.argv)
    out = predict(a.weights, a.input, a.output, dataset=a.dataset, batch_size=a.batch_size,
                  accelerator=a.accelerator, ranks=ranks)
    if ranks.is_main and not a.quiet:
        print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("predict", help="denoise a cube with trained weights (one inference pass)")
    s.add_argument("weights", help="run directory or unet_denoiser.pt (with config.yaml beside it)")
    s.add_argument("input", help="Zarr cube (array, or group with --dataset)")
    s.add_argument("output", help="new Zarr array for the denoised cube")
    s.add_argument("--dataset")
    s.add_argument("--batch-size", type=int, dest="batch_size")
    s.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    s.add_argument("--devices", type=int, help="processes on this node (several: distributed inference)")
    s.set_defaults(func=cmd_predict)
