"""``stemdist evaluate RUN_DIR``: measured quality of a run, streamed chunk by chunk.

Writes ``RUN_DIR/report/metrics.json`` and the figures of :mod:`stemdist.quality.figures`. The estimates are
the raw cube, every kept cycle, the final cube and, with ``--baselines``, the classical baselines
(written to ``RUN_DIR/report/baselines.zarr``). They are compared with the truth (``--truth``), or
lacking it with a high-dose acquisition (``--reference``) scaled to the raw cube's mean counts per
pattern. A run on a ``stemdist synth`` cube finds its truth by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
import zarr

from .. import console
from ..errors import InputError
from ..layout import FINAL, RunPaths, cycle_number, is_complete
from . import baselines as bl
from . import figures as fig
from . import sure
from .metrics import DEFINITIONS, Masks, blind_spot_reference, evaluate_cubes, find_masks, mean_pattern
from .metrics import virtual_images_lazy as lazy_virtual

if TYPE_CHECKING:
    from ..config import Config

COLUMNS = ("psnr", "psnr_interior", "ssim", "rel_rmse", "bf_err", "adf_err", "com_y_err", "com_x_err")
HEADLINE = ("psnr", "bf_err", "adf_err", "com_y_err", "com_x_err")  # what users look at, and the goals' columns


def best_baselines(methods: dict[str, dict], name: str = "final") -> dict[str, dict]:
    """Per headline column, the best baseline for that column and how ``name`` compares with it: PSNR
    difference in dB (goal >= +3), error ratio (goal <= 0.8)."""
    out = {}
    for col in HEADLINE:
        scored = {b: m[col] for b, m in methods.items() if bl.is_baseline(b)}
        if not scored:
            return {}
        best = (max if col == "psnr" else min)(scored, key=scored.get)
        mine, bar = methods[name][col], scored[best]
        out[col] = {"best": best, "value": bar,
                    **({"delta_db": mine - bar} if col == "psnr" else {"ratio": mine / bar if bar else float("inf")})}
    return out


def dose_gains(methods: dict[str, dict]) -> dict[str, dict]:
    """Per method and headline column, the raw dose that would give the same error, as a multiple of the
    actual dose: ``(raw error / error)²``, and ``10^(ΔPSNR / 10)`` for PSNR ("as good as N x the dose")."""
    raw = methods["raw"]
    return {name: {col: (10 ** ((m[col] - raw[col]) / 10) if col == "psnr"
                         else (raw[col] / m[col]) ** 2 if m[col] > 0 else float("inf")) for col in HEADLINE}
            for name, m in methods.items()}


def _open(path: str | Path, dataset: str | None = None) -> da.Array:
    from ..io.formats import open_source

    arr, _ = open_source(path, dataset)
    return arr


def synth_truth(raw_path: str | Path) -> Path | None:
    """The ``truth`` array beside a ``stemdist synth`` cube's ``noisy`` array, if the run used one."""
    raw_path = Path(raw_path)
    parent = raw_path.parent
    if raw_path.name != "noisy" or not (parent / "truth").exists():
        return None
    try:
        group = zarr.open_group(str(parent), mode="r")
    except Exception:  # not a group
        return None
    return parent / "truth" if group.attrs.get("generator") == "stemdist.synth" else None


def total_counts(arr) -> float:
    """Mean counts per pattern (streamed)."""
    d = arr if isinstance(arr, da.Array) else da.from_zarr(arr)
    return float(d.astype(np.float64).sum(axis=(2, 3)).mean().compute())


def estimates(paths: RunPaths, raw: zarr.Array) -> dict[str, zarr.Array]:
    """raw, the complete cycles that were kept, and final."""
    out: dict[str, zarr.Array] = {"raw": raw}
    if paths.denoised.exists():
        group = zarr.open_group(str(paths.denoised), mode="r")
        for name in sorted(n for n in group.array_keys() if cycle_number(n) is not None):
            if is_complete(group[name]):
                out[name] = group[name]
        if FINAL in group and is_complete(group[FINAL]):
            out[FINAL] = group[FINAL]
    return out


def _run_config(paths: RunPaths) -> Config:
    """The run's saved configuration, or the default one for runs saved without it."""
    from ..config import load

    return load(paths.config if paths.config.exists() else None)


def evaluate(run_dir: str | Path, truth: str | Path | None = None, reference: str | Path | None = None, *,
             with_baselines: bool = False, truth_dataset: str | None = None, truth_scale: float = 1.0,
             reference_dataset: str | None = None, sigmas=bl.SIGMAS, pca_rank: int = 8,
             center: tuple[float, float] | None = None, bf_radius: float | None = None,
             adf_inner: float | None = None, adf_outer: float | None = None, threshold: float = 0.5,
             figures: bool = True) -> dict:
    """Metrics (and figures) of a run; returns what ``metrics.json`` holds."""
    paths = RunPaths.of(run_dir)
    if not paths.run_info.exists():
        raise InputError(f"{paths.root} holds no stemdist run (no run.json)")
    info = json.loads(paths.run_info.read_text())
    raw = zarr.open_array(info["raw"], mode="r")
    out_dir = fig.report_dir(paths.root)
    cubes: dict[str, object] = estimates(paths, raw)
    if "final" not in cubes:
        raise InputError(f"{paths.root}: the run has no complete final cube yet (finish it with --resume)")

    masks = find_masks(mean_pattern(raw), threshold, center, bf_radius, adf_inner, adf_outer)
    sure_sigma, config = None, _run_config(paths)
    sectors = config.output.fuse_sectors  # the bar's fused_mean fuses as the run did, the mean pattern its "network"
    if with_baselines:
        sure_sigma = sure.sure_sigma(np.load(paths.raw_bf))
        written = bl.write(raw, out_dir / "baselines.zarr", sure_sigma, sigmas, rank=pca_rank, sectors=sectors)
        cubes.update(written)

    against, truth_arr, truth_desc = None, None, None
    if truth is None and reference is None:
        found = synth_truth(info["raw"])
        if found is not None:
            truth = found
    if truth is not None:
        truth_arr = _open(truth, truth_dataset).astype(np.float64) * truth_scale
        against, truth_desc = "truth", {"path": str(truth), "scale": truth_scale}
    elif reference is not None:
        ref = _open(reference, reference_dataset)
        scale = total_counts(raw) / total_counts(ref)
        truth_arr = ref.astype(np.float64) * scale
        against, truth_desc = "reference", {"path": str(reference), "scale": scale}
    if truth_arr is not None and tuple(truth_arr.shape) != tuple(raw.shape):
        raise InputError(f"{against} shape {tuple(truth_arr.shape)} differs from the raw cube's "
                         f"{tuple(raw.shape)}")

    result = {"run": str(paths.root), "raw": info["raw"], "shape": list(raw.shape), "against": against,
              "truth": truth_desc, "masks": masks.to_dict(), "definitions": DEFINITIONS,
              "baselines": {"gaussian_sigmas": list(sigmas), "sure_sigma": sure_sigma, "pca_rank": pca_rank,
                            "fuse_sectors": sectors}
              if with_baselines else None}
    if truth_arr is not None:
        metrics, virtual, tv, data_range = evaluate_cubes(cubes, truth_arr, masks)
        result["data_range"] = data_range
        result["methods"] = metrics
        result["best_baselines"] = best_baselines(metrics) if with_baselines else None
        result["dose_gain"] = dose_gains(metrics)
        result["blind_spot"] = blind_spot_reference(tv, config.model.halo)
        truth_name = "truth" if against == "truth" else "high-dose reference (scaled)"
        images = {**virtual, truth_name: tv}
    else:
        imgs = da.compute(*[lazy_virtual(c, masks) for c in cubes.values()])
        images = dict(zip(cubes, imgs, strict=True))
        truth_name = None
        result["methods"] = result["best_baselines"] = result["dose_gain"] = None
    paths.metrics.write_text(json.dumps(result, indent=2))
    if figures:
        result["figures"] = [str(p) for p in draw(paths, out_dir, cubes, images, truth_arr, truth_name, masks,
                                                   result["methods"])]
    return result


def draw(paths: RunPaths, out_dir: Path, cubes: dict, images: dict, truth_arr, truth_name: str | None,
         masks: Masks, methods: dict | None) -> list[Path]:
    show = ["raw", "final"] + [n for n in ("gaussian_sure", "pca", "pca_gaussian") if n in cubes]
    panels = {("denoised" if n == "final" else n): images[n] for n in show}
    pattern_cubes = {"raw": cubes["raw"], "denoised": cubes["final"]}
    if truth_name is not None:
        panels[truth_name] = images[truth_name]
        pattern_cubes[truth_name] = truth_arr
    H, W = cubes["raw"].shape[:2]
    drawn = [fig.virtual_figure(out_dir / "virtual_images.png", panels, masks=masks),
             fig.patterns_figure(out_dir / "patterns.png", pattern_cubes, fig.example_positions(H, W))]
    loss = fig.loss_figure(out_dir / "loss.png", paths.root)
    if loss is not None:
        drawn.append(loss)
    if methods is not None:
        per_cycle = fig.cycle_metrics_figure(out_dir / "metrics_per_cycle.png", methods)
        if per_cycle is not None:
            drawn.append(per_cycle)
    return drawn


def table(methods: dict[str, dict], columns=COLUMNS) -> str:
    """One row per method."""
    return console.table(["method", *columns], [[name, *(m[c] for c in columns)] for name, m in methods.items()])


def summary_lines(result: dict, name: str = "final") -> list[str]:
    """The final cube against the best baseline for each column, and its dose gains."""
    lines = []
    best = result.get("best_baselines")
    if best:
        parts = [f"PSNR {best['psnr']['delta_db']:+.2f} dB vs {best['psnr']['best']}"]
        parts += [f"{c[:-4].replace('_', ' ')} {best[c]['ratio']:.2f}x {best[c]['best']}" for c in HEADLINE[1:]]
        lines.append(f"{name} vs the best baseline for each column (goals: >= +3 dB, <= 0.8x): " + "; ".join(parts))
    methods = result.get("methods") or {}
    bias = [f"{m} BF mean {methods[m]['bf_mean']:.2f}x, contrast {methods[m]['bf_contrast']:.2f}x, ADF mean "
            f"{methods[m]['adf_mean']:.2f}x, contrast {methods[m]['adf_contrast']:.2f}x"
            for m in ("raw", "cycle_01", name) if m in methods and "bf_mean" in methods[m]]
    if bias:
        lines.append("bias against the truth (1 = right; cycle_01 is the network alone): " + "; ".join(bias))
    ref = result.get("blind_spot")
    if ref:
        lines.append(f"the truth's neighbour mean (a blind-spot network's reference: it never sees the centre): "
                     f"BF contrast {ref['bf_contrast']:.2f}x, error {ref['bf_err']:.3f}; ADF contrast "
                     f"{ref['adf_contrast']:.2f}x, error {ref['adf_err']:.3f}")
    gain = (result.get("dose_gain") or {}).get(name)
    if gain:
        lines.append(f"{name} is as good as raw data at N x the dose: "
                     + ", ".join(f"{'PSNR' if c == 'psnr' else c[:-4].replace('_', ' ')} {gain[c]:.1f}x"
                                 for c in HEADLINE))
    return lines
