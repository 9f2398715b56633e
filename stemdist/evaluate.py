"""``stemdist evaluate RUN_DIR``: measured quality of a run, streamed chunk by chunk.

Writes ``RUN_DIR/report/metrics.json`` and the figures of :mod:`stemdist.report`. The estimates are
the raw cube, every kept cycle, the final cube and, with ``--baselines``, the classical baselines
(written to ``RUN_DIR/report/baselines.zarr``). They are compared with the truth (``--truth``), or
lacking it with a high-dose acquisition (``--reference``) scaled to the raw cube's mean counts per
pattern. A run on a ``stemdist synth`` cube finds its truth by itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from . import baselines as bl
from . import report
from .cycles import RunPaths
from .errors import InputError
from .metrics import DEFINITIONS, VIRTUAL, Masks, evaluate_cubes, find_masks, mean_pattern
from .metrics import virtual_images_lazy as lazy_virtual
from .progress import dask_bar

COLUMNS = ("psnr", "psnr_interior", "ssim", "rel_rmse", "bf_err", "adf_err", "com_y_err", "com_x_err")


def _open(path: str | Path, dataset: str | None = None) -> da.Array:
    from .formats import open_source

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
        for name in sorted(n for n in group.array_keys() if n.startswith("cycle_")):
            if group[name].attrs.get("complete"):
                out[name] = group[name]
        if "final" in group and group["final"].attrs.get("complete"):
            out["final"] = group["final"]
    return out


def evaluate(run_dir: str | Path, truth: str | Path | None = None, reference: str | Path | None = None, *,
             with_baselines: bool = False, truth_dataset: str | None = None, truth_scale: float = 1.0,
             reference_dataset: str | None = None, sigma: float = 1.0, pca_rank: int = 8,
             center: tuple[float, float] | None = None, bf_radius: float | None = None,
             adf_inner: float | None = None, adf_outer: float | None = None, threshold: float = 0.5,
             figures: bool = True) -> dict:
    """Metrics (and figures) of a run; returns what ``metrics.json`` holds."""
    paths = RunPaths(Path(run_dir).resolve())
    if not paths.run_info.exists():
        raise InputError(f"{paths.root} holds no stemdist run (no run.json)")
    info = json.loads(paths.run_info.read_text())
    raw = zarr.open_array(info["raw"], mode="r")
    out_dir = report.report_dir(paths.root)
    cubes: dict[str, object] = estimates(paths, raw)
    if "final" not in cubes:
        raise InputError(f"{paths.root}: the run has no complete final cube yet (finish it with --resume)")

    masks = find_masks(mean_pattern(raw), threshold, center, bf_radius, adf_inner, adf_outer)
    if with_baselines:
        written = bl.write(raw, out_dir / "baselines.zarr", sigma=sigma, rank=pca_rank)
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
              "baselines": {"gaussian_sigma": sigma, "pca_rank": pca_rank} if with_baselines else None}
    if truth_arr is not None:
        metrics, virtual, tv, data_range = evaluate_cubes(cubes, truth_arr, masks)
        result["data_range"] = data_range
        result["methods"] = metrics
        truth_name = "truth" if against == "truth" else "high-dose reference (scaled)"
        images = {**virtual, truth_name: tv}
    else:
        imgs = da.compute(*[lazy_virtual(c, masks) for c in cubes.values()])
        images = dict(zip(cubes, imgs, strict=True))
        truth_name = None
        result["methods"] = None
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if figures:
        result["figures"] = [str(p) for p in draw(paths, out_dir, cubes, images, truth_arr, truth_name, masks,
                                                   result["methods"])]
    return result


def draw(paths: RunPaths, out_dir: Path, cubes: dict, images: dict, truth_arr, truth_name: str | None,
         masks: Masks, methods: dict | None) -> list[Path]:
    show = ["raw", "final"] + [n for n in bl.NAMES if n in cubes]
    panels = {("denoised" if n == "final" else n): images[n] for n in show}
    pattern_cubes = {"raw": cubes["raw"], "denoised": cubes["final"]}
    if truth_name is not None:
        panels[truth_name] = images[truth_name]
        pattern_cubes[truth_name] = truth_arr
    H, W = cubes["raw"].shape[:2]
    drawn = [report.virtual_figure(out_dir / "virtual_images.png", panels, masks=masks),
             report.patterns_figure(out_dir / "patterns.png", pattern_cubes, report.example_positions(H, W))]
    loss = report.loss_figure(out_dir / "loss.png", paths.root)
    if loss is not None:
        drawn.append(loss)
    if methods is not None:
        fig = report.cycle_metrics_figure(out_dir / "metrics_per_cycle.png", methods)
        if fig is not None:
            drawn.append(fig)
    return drawn


def table(methods: dict[str, dict], columns=COLUMNS) -> str:
    """A plain-text table: one row per method."""
    width = max(10, *(len(m) for m in methods))
    head = f"{'method':<{width}} " + " ".join(f"{c:>13}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{m[c]:>13.4f}" for c in columns))
    return "\n".join(lines)


def cmd_evaluate(a: argparse.Namespace) -> int:
    with dask_bar("evaluate"):
        result = evaluate(a.run_dir, a.truth, a.reference, with_baselines=a.baselines,
                          truth_dataset=a.truth_dataset, truth_scale=a.truth_scale,
                          reference_dataset=a.reference_dataset, sigma=a.sigma, pca_rank=a.pca_rank,
                          center=tuple(a.center) if a.center else None, bf_radius=a.bf_radius,
                          adf_inner=a.adf_inner, adf_outer=a.adf_outer, threshold=a.threshold)
    if not a.quiet:
        m = result["masks"]
        print(f"masks: centre ({m['center'][0]:.1f}, {m['center'][1]:.1f}), "
              f"BF radius {m['bf_radius']:.1f} px, "
              f"ADF {m['adf_inner']:.1f}-{m['adf_outer']:.1f} px")
        if result["methods"] is None:
            print("no truth or reference: figures only (give --truth or --reference for metrics)")
        else:
            print(f"against the {result['against']} ({result['truth']['path']}), data range L = "
                  f"{result['data_range']:.4g}")
            print(table(result["methods"]))
        print(f"wrote {Path(a.run_dir) / report.REPORT / 'metrics.json'} and "
              f"{len(result.get('figures', []))} figures")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("evaluate", help="metrics and figures of a run against a truth or high-dose reference")
    s.add_argument("run_dir", help="a denoise run directory")
    s.add_argument("--truth", help="noise-free cube (expected counts) with the raw cube's shape")
    s.add_argument("--truth-dataset", help="array name inside the truth file or Zarr group")
    s.add_argument("--truth-scale", type=float, default=1.0,
                   help="multiply the truth by this (e.g. the dose, for patterns normalised to sum 1)")
    s.add_argument("--reference",
                   help="high-dose acquisition, scaled to the raw cube's counts (lacking a truth)")
    s.add_argument("--reference-dataset")
    s.add_argument("--baselines", action="store_true",
                   help="also score Gaussian smoothing over the scan, the 8-neighbour mean and PCA")
    s.add_argument("--sigma", type=float, default=1.0, help="Gaussian baseline sigma, in probe positions")
    s.add_argument("--pca-rank", type=int, default=8, help="PCA baseline rank")
    s.add_argument("--center", type=float, nargs=2, metavar=("Y", "X"), help="disk centre, detector pixels")
    s.add_argument("--bf-radius", type=float,
                   help="bright-field disk radius, pixels (default: from the data)")
    s.add_argument("--adf-inner", type=float, help="ADF inner radius (default 1.2 x BF radius)")
    s.add_argument("--adf-outer", type=float, help="ADF outer radius (default 3 x BF radius)")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="BF disk: pixels of the mean pattern above this fraction of its maximum")
    s.set_defaults(func=cmd_evaluate)


__all__ = ["COLUMNS", "VIRTUAL", "add_parser", "evaluate", "table"]
