"""``stemdist predict``: apply trained weights to a cube (one distributed inference pass, no training)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import zarr

from .. import config as cfg
from ..console import bar
from ..data.tiles import Grid
from ..errors import InputError
from ..io.checks import check_chunks, check_values
from ..io.zarr_store import create_cube, default_tile, open_cube
from ..layout import COMPLETE, CONFIG, RunPaths, mark_complete, require_complete
from ..train.module import Denoiser, averaged, split_weights
from . import hardware
from . import ranks as rk
from .inference import infer

log = logging.getLogger("stemdist")


def _weights_and_config(source: Path) -> tuple[Path, cfg.Config]:
    """A run directory, or a weights file with ``config.yaml`` beside it."""
    weights = RunPaths(source).weights if source.is_dir() else source
    conf_file = weights.parent / CONFIG
    if not weights.exists():
        raise InputError(f"{weights} does not exist (expected a run directory or a weights file)")
    if not conf_file.exists():
        raise InputError(f"{conf_file} not found: the network's shape comes from the run's {CONFIG}")
    return weights, cfg.load(conf_file)


def predict(source: str | Path, input_path: str | Path, output: str | Path, *, dataset: str | None = None,
            batch_size: int | None = None, accelerator: str | None = None,
            ranks: rk.Ranks | None = None) -> Path:
    """Denoise ``input_path`` with the weights of ``source`` into the new Zarr array ``output``."""
    ranks = ranks or rk.detect()
    weights, config = _weights_and_config(Path(source))
    if accelerator:
        config = cfg.apply(config, {"hardware": {"accelerator": accelerator}}, "--accelerator")
    output = Path(output)
    rk.init(ranks, hardware.use_cuda(config))

    def create() -> None:
        if output.exists():
            raise InputError(f"output {output} already exists; remove it or choose another path")
        raw = open_cube(input_path, dataset)
        require_complete(raw, str(input_path))
        check_chunks(raw, str(input_path))
        check_values(raw, str(input_path))
        whole = tuple(raw.chunks[2:]) == tuple(raw.shape[2:])
        tile = tuple(raw.chunks[:2]) if whole else default_tile(raw.shape)
        create_cube(output, None, tuple(raw.shape), tile, attrs={COMPLETE: False, "weights": str(weights.resolve())})

    rk.run_on_main(create, ranks)
    raw = open_cube(input_path, dataset)
    out = zarr.open_array(str(output), mode="r+")
    module = Denoiser(config.model, config.train)
    last, members = split_weights(torch.load(weights, map_location="cpu"))
    module.net.load_state_dict(last)
    hardware.setup(config, ranks)
    device = hardware.device(config, ranks)
    model = averaged(module, members).to(device)
    with bar("inference", Grid.of(out).n_tiles // ranks.world_size, ranks.is_main) as advance:
        infer(model, raw, None, 0.0, out, borders=config.data.borders,
              batch_size=batch_size or config.inference.batch_size, device=device, rank=ranks.rank,
              world_size=ranks.world_size, cache_chunks=config.data.cache_chunks,
              autocast=hardware.autocast_dtype(config), progress=advance,
              threads=hardware.io_threads(ranks.local_world_size), halo=config.model.halo)
    rk.barrier()
    if ranks.is_main:
        mark_complete(out)
    rk.barrier()
    return output
