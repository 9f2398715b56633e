"""The Python API: ``stemdist.denoise`` and the demo behind ``stemdist demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as cfg
from .layout import RunPaths


def run_denoise(input_path: str | Path, out: str | Path, config: cfg.Config, *, dataset: str | None = None,
                reference: str | Path | None = None, resume: bool = False, overrides: dict | None = None,
                ranks=None) -> RunPaths:
    """Check the reference cube up front, then run the cycles."""
    if reference is not None:
        from .io.checks import check_shape
        from .io.formats import open_source

        ref, _ = open_source(reference)
        check_shape(ref.shape, str(reference))
    from .run.pipeline import run

    return run(input_path, out, config, dataset=dataset, reference=reference, resume=resume,
               overrides=overrides, ranks=ranks)


def denoise(input: Any, out: str | Path | None = None, config: str | Path | None = None, *,
            dataset: str | None = None, reference: str | Path | None = None, resume: bool = False,
            **overrides: Any) -> Any:
    """Denoise a cube into the run directory ``out``.

    ``input`` is a file path (returns the run's :class:`~stemdist.layout.RunPaths`), or an object, returned
    as the same kind with the final cube: a numpy array (-> numpy), a dask array (-> dask, lazy over the
    run's Zarr), a HyperSpy ``Signal2D`` or pyxem signal (-> the same class, axes, calibrations and metadata
    kept; lazy when the input was lazy) or a py4DSTEM ``DataCube`` (-> a DataCube, calibration kept). An
    object is streamed into ``out/input.zarr`` chunk by chunk and never modified. ``out`` may be left out
    for objects: a new folder ``stemdist-*`` in the system's temporary directory (a lazy result reads it).

    ``overrides`` are shortcuts (``cycles=2``, ``epochs=3``, ``batch_size``, ``accelerator``, ``devices``,
    ``num_nodes``) or whole sections (``train={"lr": 5e-4}``).
    """
    from .io.formats import is_object

    sections = {k: v for k, v in overrides.items() if k not in cfg.SHORTCUTS}
    updates = cfg.merge(sections, cfg.shortcut_overrides(overrides))
    conf = cfg.load(config, updates)
    if not is_object(input):
        if out is None:
            raise TypeError("denoise(path, out): a file input needs the run directory `out`")
        return run_denoise(input, out, conf, dataset=dataset, reference=reference, resume=resume, overrides=updates)
    import tempfile

    import zarr

    from .io.objects import source

    src = source(input)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="stemdist-"))
    paths = run_denoise(src, out, conf, reference=reference, resume=resume, overrides=updates)
    return src.rebuild(zarr.open_array(str(paths.final), mode="r"))


def demo(out: str | Path = "stemdist-demo", quiet: bool = False) -> dict[str, float]:
    """Synthesise a small cube, denoise it with the smoke configuration, report the error against truth."""
    import shutil
    import time

    import zarr

    from .errors import InputError
    from .io.synth import synth
    from .quality.metrics import relative_rmse

    out = Path(out)
    cube, marker = out / "synthetic.zarr", out / ".stemdist-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise InputError(f"{out} holds files that are not the demo's; the demo owns its folder - choose --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    shutil.rmtree(out / "run", ignore_errors=True)  # the demo's own previous run: a rerun starts clean
    t0 = time.perf_counter()
    if not cube.exists():
        synth(cube, (24, 24), (32, 32), dose=100.0, seed=0)
    paths = denoise(cube / "noisy", out / "run", "smoke")
    truth = zarr.open_array(str(cube / "truth"), mode="r")
    raw = zarr.open_array(str(cube / "noisy"), mode="r")
    final = zarr.open_array(str(paths.final), mode="r")
    scores = {"raw": relative_rmse(raw, truth), "denoised": relative_rmse(final, truth),
              "seconds": time.perf_counter() - t0}
    if not quiet:
        print(f"synthetic cube: {cube} (noisy, truth)")
        print(f"denoised cube:  {paths.final}")
        print(f"figure:         {paths.figure}")
        print(f"relative RMSE against truth: raw {scores['raw']:.3f} -> denoised {scores['denoised']:.3f} "
              f"({scores['seconds']:.1f} s)")
    return scores
