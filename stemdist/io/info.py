"""``stemdist info PATH``: what a cube, an input file or a run directory holds, in seconds.

Only metadata is read, the size on disk is found by walking the store's files, and count statistics come
from a few whole chunks spread over the scan (the output says how many of how many were sampled), so
the command stays quick on stores of any size.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..layout import FINAL, RunPaths, cycle_name, cycle_number, is_complete, is_run_dir, member_name, read_losses

DEFAULT_SAMPLES = 8


# ----------------------------------------------------------------------------------------------- helpers
def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path`` (a file or a directory tree), without following links."""
    if path.is_file():
        return path.stat().st_size, 1
    total = files = 0
    stack = [str(path)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
    return total, files


def sample_indices(grid: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """Up to ``n`` chunk-grid indices spread evenly over the whole grid (deterministic)."""
    total = math.prod(grid)
    if total <= n:
        flat = list(range(total))
    else:
        flat = sorted({int(round(i * (total - 1) / (n - 1))) for i in range(n)}) if n > 1 else [total // 2]
    return [tuple(int(v) for v in np.unravel_index(i, grid)) for i in flat]


def pattern_stats(blocks: list[np.ndarray]) -> dict[str, Any]:
    """Counts per pattern (dose) and per pixel over the sampled blocks of (sy, sx, P, Q) data."""
    sums = np.concatenate([b.reshape(-1, b.shape[2] * b.shape[3]).sum(axis=1, dtype=np.float64)
                           for b in blocks])
    pixels = sum(b.size for b in blocks)
    zeros = sum(int(np.count_nonzero(b == 0)) for b in blocks)
    return {"patterns": int(sums.size), "mean_counts_per_pattern": float(sums.mean()),
            "std_counts_per_pattern": float(sums.std()), "min_counts_per_pattern": float(sums.min()),
            "max_counts_per_pattern": float(sums.max()),
            "mean_counts_per_pixel": float(sums.sum() / pixels) if pixels else 0.0,
            "max_pixel": float(max(float(b.max()) for b in blocks)),
            "zero_fraction": zeros / pixels if pixels else 0.0}


def codec_names(arr) -> str:
    parts = []
    for c in (*getattr(arr, "filters", ()), *getattr(arr, "compressors", ())):
        d = c.to_dict() if hasattr(c, "to_dict") else {"name": type(c).__name__}
        conf = d.get("configuration", {}) or {}
        name = d.get("name", type(c).__name__)
        if name == "blosc":
            shuffle = conf.get("shuffle")
            parts.append(f"blosc-{conf.get('cname')} (level {conf.get('clevel')}, {shuffle})")
        else:
            parts.append(name + (f" {conf}" if conf else ""))
    return ", ".join(parts) or "none (uncompressed)"


# ------------------------------------------------------------------------------------------ describers
def describe_zarr_array(arr, store_path: Path, samples: int) -> dict[str, Any]:
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    grid = tuple(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))
    array_dir = store_path / arr.path if arr.path else store_path
    on_disk, files = disk_usage(array_dir)
    raw = math.prod(shape) * arr.dtype.itemsize
    info: dict[str, Any] = {
        "kind": "zarr array", "path": str(array_dir), "shape": list(shape), "chunks": list(chunks),
        "shards": list(arr.shards) if getattr(arr, "shards", None) else None, "dtype": str(arr.dtype),
        "codec": codec_names(arr), "zarr_format": arr.metadata.zarr_format, "size_on_disk": on_disk,
        "files": files, "uncompressed": raw, "ratio": raw / on_disk if on_disk else None,
        "chunks_total": math.prod(grid), "attrs": dict(arr.attrs)}
    if len(shape) == 4 and all(shape):
        picks = sample_indices(grid, samples)
        blocks = [arr[tuple(slice(i * c, min((i + 1) * c, s))
                            for i, c, s in zip(idx, chunks, shape, strict=True))] for idx in picks]
        info["chunks_sampled"] = len(picks)
        info["stats"] = pattern_stats(blocks)
    return info


def describe_source(path: Path, dataset: str | None, samples: int) -> dict[str, Any]:
    """Any other input file (detector formats, HDF5, .npy): opened lazily, a few blocks sampled."""
    from .formats import open_source

    arr, attrs = open_source(path, dataset)
    on_disk = disk_usage(path)[0]
    if path.suffix.lower() == ".xml":  # EMPAD: the frames live in the .raw named beside it
        on_disk += sum(p.stat().st_size for p in path.parent.glob("*.raw"))
    grid = tuple(len(c) for c in arr.chunks)
    picks = sample_indices(grid, samples)
    blocks = [np.asarray(arr.blocks[idx].compute()) for idx in picks] if arr.ndim == 4 else []
    info: dict[str, Any] = {
        "kind": f"{attrs.get('source_format', path.suffix.lstrip('.'))} file", "path": str(path),
        "shape": list(arr.shape), "chunks": [max(c) for c in arr.chunks], "dtype": str(arr.dtype),
        "codec": "(source file)", "size_on_disk": on_disk, "uncompressed": int(arr.nbytes),
        "chunks_total": math.prod(grid), "attrs": attrs}
    if blocks:
        info["chunks_sampled"] = len(picks)
        info["stats"] = pattern_stats(blocks)
    return info


def _epoch_losses(root: Path) -> dict[str, Any]:
    """Per cycle (and ``train.ensemble`` member past the first), the first and last epoch loss (from the run's
    loss log)."""
    per: dict[str, list[float]] = {}
    for r in read_losses(root):
        name = "/".join(p for p in (cycle_name(r["cycle"]), member_name(r["member"])) if p)
        per.setdefault(name, []).append(r["loss"])
    return {c: {"loss_epoch": {"first": v[0], "last": v[-1], "epochs": len(v)}} for c, v in per.items()}


def describe_run(run: Path, samples: int) -> dict[str, Any]:
    import yaml
    import zarr

    paths = RunPaths(run)
    info: dict[str, Any] = {"kind": "run directory", "path": str(run)}
    run_info = paths.read_info()
    info["run"] = run_info
    total = None
    if paths.config.exists():
        conf = yaml.safe_load(paths.config.read_text()) or {}
        total = (conf.get("train") or {}).get("cycles")
    info["cycles_planned"] = total
    done, arrays = [], {}
    if paths.denoised.exists():
        group = zarr.open_group(str(paths.denoised), mode="r")
        for name, arr in sorted(group.arrays()):
            arrays[name] = is_complete(arr)
            if cycle_number(name) is not None and arrays[name]:
                done.append(name)
        if arrays.get(FINAL):
            info["final"] = describe_zarr_array(group[FINAL], paths.denoised, samples)
    info["cycles_completed"] = len(done)
    info["arrays"] = arrays
    try:
        info["losses"] = _epoch_losses(run)
    except (OSError, ValueError, KeyError, csv.Error) as exc:
        info["losses"] = {"log": {"error": str(exc)}}
    if paths.metrics.exists():
        try:
            info["metrics"] = json.loads(paths.metrics.read_text())
        except ValueError as exc:
            info["metrics"] = {"error": f"unreadable metrics.json: {exc}"}
    raw = run_info.get("raw")
    if raw and Path(raw).exists():
        info["input"] = describe_zarr_array(zarr.open_array(raw, mode="r"), Path(raw), samples)
    return info


def describe(path: str | Path, dataset: str | None = None, samples: int = DEFAULT_SAMPLES) -> dict[str, Any]:
    """A dictionary describing ``path``: a run directory, a Zarr store (array or group) or an input file."""
    import zarr

    from .zarr_store import is_zarr

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if samples < 1:
        raise InputError("--samples must be at least 1")
    if path.is_dir() and is_run_dir(path):
        return describe_run(path, samples)
    if is_zarr(path):
        node = zarr.open(store=str(path), mode="r")
        if isinstance(node, zarr.Array):
            return describe_zarr_array(node, path, samples)
        names = sorted(name for name, _ in node.arrays())
        if dataset is not None:
            if dataset not in names:
                raise InputError(f"{path}: no array {dataset!r} in this Zarr group (it holds {names})")
            names = [dataset]
        total, files = disk_usage(path)
        return {"kind": "zarr group", "path": str(path), "size_on_disk": total, "files": files,
                "attrs": dict(node.attrs),
                "arrays": {name: describe_zarr_array(node[name], path, samples) for name in names}}
    if path.is_dir():
        raise InputError(f"{path}: a directory that is neither a Zarr store nor a stemdist run (no run.json)")
    return describe_source(path, dataset, samples)


# ------------------------------------------------------------------------------------------- printing
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _calibration_line(calib: dict[str, Any]) -> str:
    parts = []
    for axis in ("scan_y", "scan_x", "det_y", "det_x"):
        c = calib.get(axis) or {}
        parts.append(f"{axis} {_fmt(c.get('scale', 1.0))} {c.get('units') or 'px'}")
    return ", ".join(parts)


def format_array(info: dict[str, Any], indent: str = "") -> list[str]:
    lines = [f"{indent}{info['kind']}: {info['path']}",
             f"{indent}  shape   {tuple(info['shape'])}  (scan_y, scan_x, det_y, det_x)"
             if len(info["shape"]) == 4 else f"{indent}  shape   {tuple(info['shape'])}",
             f"{indent}  chunks  {tuple(info['chunks'])}  ({info['chunks_total']} chunks)"
             + (f", shards {tuple(info['shards'])}" if info.get("shards") else ""),
             f"{indent}  dtype   {info['dtype']}",
             f"{indent}  codec   {info['codec']}"]
    size = f"{indent}  on disk {human(info['size_on_disk'])}"
    if info.get("files") is not None and info["kind"] == "zarr array":
        size += f" in {info['files']} files"
    if info.get("ratio"):
        size += f" (uncompressed {human(info['uncompressed'])}, ratio {info['ratio']:.2f}x)"
    lines.append(size)
    attrs = info.get("attrs") or {}
    if attrs.get("calibration"):
        lines.append(f"{indent}  calibration  {_calibration_line(attrs['calibration'])}")
    if attrs.get("source"):
        lines.append(f"{indent}  source  {attrs['source']}")
    st = info.get("stats")
    if st:
        n, m = info["chunks_sampled"], info["chunks_total"]
        how = f"all {m} chunks" if n == m else f"sampled {n} of {m} chunks"
        lines += [f"{indent}  counts ({how}, {st['patterns']} patterns):",
                  f"{indent}    dose (mean counts per pattern) {_fmt(st['mean_counts_per_pattern'])}"
                  f" +- {_fmt(st['std_counts_per_pattern'])}  (min {_fmt(st['min_counts_per_pattern'])},"
                  f" max {_fmt(st['max_counts_per_pattern'])})",
                  f"{indent}    mean counts per pixel {_fmt(st['mean_counts_per_pixel'])}, max pixel "
                  f"{_fmt(st['max_pixel'])}, zero pixels {100 * st['zero_fraction']:.1f}%"]
    return lines


def format_info(info: dict[str, Any]) -> str:
    kind = info["kind"]
    if kind == "zarr group":
        lines = [f"zarr group: {info['path']}  ({human(info['size_on_disk'])} on disk "
                 f"in {info['files']} files)"]
        for name, arr in info["arrays"].items():
            lines.append(f"- array {name!r}")
            lines += format_array(arr, "  ")
        return "\n".join(lines)
    if kind != "run directory":
        return "\n".join(format_array(info))
    run = info["run"]
    planned = info.get("cycles_planned")
    lines = [f"run directory: {info['path']}",
             f"  input   {run.get('input')}" + (f" [{run['dataset']}]" if run.get("dataset") else ""),
             f"  cycles completed {info['cycles_completed']}" + (f" of {planned}" if planned else ""),
             "  arrays  " + (", ".join(f"{k}{'' if v else ' (incomplete)'}"
                                       for k, v in info["arrays"].items()) or "none yet")]
    if info["losses"]:
        lines.append("  losses (per cycle: first -> last epoch):")
        for cycle, cols in info["losses"].items():
            if "error" in cols:
                lines.append(f"    {cycle}: {cols['error']}")
                continue
            text = ", ".join(f"{col} {_fmt(v['first'])} -> {_fmt(v['last'])} ({v['epochs']} epochs)"
                             for col, v in cols.items())
            lines.append(f"    {cycle}: {text or 'no epoch logged yet'}")
    if "metrics" in info:
        lines.append("  metrics (report/metrics.json):")
        lines += [f"    {k}: {_fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)}"
                  for k, v in _flatten(info["metrics"]).items()]
    if "final" in info:
        lines.append("  final cube:")
        lines += format_array(info["final"], "    ")
    if "input" in info:
        lines.append("  input cube:")
        lines += format_array(info["input"], "    ")
    return "\n".join(lines)


def _flatten(d: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and depth < 2:
            out.update(_flatten(v, key, depth + 1))
        else:
            out[key] = v
    return out
