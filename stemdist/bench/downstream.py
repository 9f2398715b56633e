"""``stemdist bench downstream``: stemdist's final cube through analyses other packages wrote.

On the simulated SrTiO3 cubes of ``../shared/data`` (truth = clean x dose) at doses 20, 100 and 500, each
method's cube goes through the same analyses as the truth, and each result is scored against the
truth's: the error's RMS over the truth result's standard deviation, both taken about their means (phases
have an arbitrary offset). Methods: the raw counts, scan Gaussians at sigma 1 and at the SURE width (chosen
on the raw bright-field image, as stemdist's fusion does), PCA with 8 components, and stemdist's final
cube (a ``denoise`` run with the given configuration). Analyses:

- ``BF``, ``ADF``: HyperSpy's virtual imaging, ``hyperspy.roi.CircleROI`` (an annulus for ADF) applied to
  the signal with calibrated detector axes, summed;
- ``CoM y``, ``CoM x``, ``DPC phase``: py4DSTEM's ``DPC`` (centre of mass, then the phase integrated from it);
- ``ptycho phase``: py4DSTEM's ``SingleslicePtychography`` (gradient descent, ``--iterations``);

py4DSTEM (numpy<2) runs in its own interpreter (``$STEMDIST_PY4DSTEM_PYTHON`` or ``.venv-py4dstem``);
without one its columns are skipped with the reason. ``--smoke``: a 12 x 12 crop, the smoke configuration,
two ptychography iterations. Headline: at how many (dose, analysis) pairs stemdist has the lowest error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from . import common

SHARED = common.shared_data()
DOSES = (20, 100, 500)
ENERGY, SEMIANGLE, SCAN_STEP, MRAD_PER_PX = 300e3, 20.0, 0.081, 1.5  # the shared simulation (its README)
METHODS = ("raw", "gaussian s=1", "gaussian SURE", "pca-8", "stemdist")
HS_COLUMNS, P4_COLUMNS = ("BF", "ADF"), ("CoM y", "CoM x", "DPC phase", "ptycho phase")

# Runs in py4DSTEM's interpreter: argv = folder of NAME.npy cubes, iterations; writes NAME.p4.npz per cube.
PY4DSTEM_SCRIPT = r"""
import sys, warnings
from pathlib import Path
import numpy as np
warnings.filterwarnings("ignore")
import py4DSTEM
from py4DSTEM.process.phase import DPC, SingleslicePtychography
folder, iterations = Path(sys.argv[1]), int(sys.argv[2])
energy, semiangle, step, mrad = (float(v) for v in sys.argv[3:7])
for path in sorted(folder.glob("*.npy")):
    dc = py4DSTEM.DataCube(data=np.load(path).astype(np.float32))
    dc.calibration.set_R_pixel_size(step); dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(mrad); dc.calibration.set_Q_pixel_units("mrad")
    dpc = DPC(datacube=dc, energy=energy, verbose=False).preprocess(
        force_com_rotation=0, force_com_transpose=False, plot_center_of_mass=None, plot_rotation=False)
    dpc = dpc.reconstruct(max_iter=32, progress_bar=False)
    pty = SingleslicePtychography(energy=energy, datacube=dc, semiangle_cutoff=semiangle, verbose=False, device="cpu")
    pty = pty.preprocess(plot_center_of_mass=None, plot_rotation=False, plot_probe_overlaps=False,
                         force_com_rotation=0, force_com_transpose=False)
    pty = pty.reconstruct(num_iter=iterations, progress_bar=False, seed_random=0)
    np.savez(path.with_suffix(".p4.npz"), com_y=np.asarray(dpc._com_measured_x), com_x=np.asarray(dpc._com_measured_y),
             dpc=np.asarray(dpc.object_phase), ptycho=np.angle(np.asarray(pty.object_cropped)))
print("done")
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, "a 12 x 12 crop, the smoke configuration, 2 ptychography iterations (CI)")
    p.add_argument("--data", type=Path, default=SHARED, help="folder of srtio3_clean.npy and srtio3_doseD.npy")
    p.add_argument("--doses", type=int, nargs="+", default=list(DOSES))
    p.add_argument("--scan-crop", type=int, help="top-left crop of the scan (default: all of it; smoke: 12)")
    p.add_argument("--config", default=None, help="stemdist configuration for its runs (default: default)")
    p.add_argument("--epochs", type=int, help="train.epochs of stemdist's runs")
    p.add_argument("--iterations", type=int, default=8, help="ptychography iterations")


def py4dstem_python() -> tuple[str | None, str]:
    """An interpreter that imports py4DSTEM, or None and why not."""
    candidates = [os.environ.get("STEMDIST_PY4DSTEM_PYTHON"), str(Path.cwd() / ".venv-py4dstem" / "bin" / "python"),
                  sys.executable]
    for exe in candidates:
        if exe and Path(exe).exists():
            if subprocess.run([exe, "-c", "import py4DSTEM"], capture_output=True).returncode == 0:
                return exe, ""
    return None, "no interpreter imports py4DSTEM (set STEMDIST_PY4DSTEM_PYTHON, or make .venv-py4dstem)"


def error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """RMS of the difference over the truth's standard deviation, both about their means."""
    e, t = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    e, t = e - e.mean(), t - t.mean()
    return float(np.sqrt(np.mean((e - t) ** 2)) / max(t.std(), 1e-30))


def hyperspy_images(cube: np.ndarray, centre: tuple[float, float], bf: float, adf: tuple[float, float]
                    ) -> dict[str, np.ndarray]:
    """Virtual BF and ADF images through HyperSpy's circular ROIs on calibrated detector axes (mrad)."""
    import logging

    logging.getLogger("hyperspy").setLevel(logging.ERROR)  # "numba is not installed": not about this bench
    import hyperspy.api as hs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = hs.signals.Signal2D(cube)
        for ax, c in zip(s.axes_manager.signal_axes, centre[::-1], strict=True):  # (x, y) order
            ax.scale, ax.offset, ax.units = MRAD_PER_PX, -c * MRAD_PER_PX, "mrad"
        rois = {"BF": hs.roi.CircleROI(cx=0, cy=0, r=bf * MRAD_PER_PX),
                "ADF": hs.roi.CircleROI(cx=0, cy=0, r=adf[1] * MRAD_PER_PX, r_inner=adf[0] * MRAD_PER_PX)}
        return {k: np.asarray(roi(s, axes=s.axes_manager.signal_axes).nansum(axis=(2, 3)).data)
                for k, roi in rois.items()}


def method_cubes(noisy: np.ndarray, root: Path, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], float]:
    """Every method's estimate of the truth from ``noisy`` (float32, in memory: the bench's cubes are small),
    and the SURE width."""
    import zarr

    from .. import config as cfg
    from ..api import run_denoise
    from ..io.zarr_store import create_cube
    from ..quality import baselines
    from ..quality.metrics import bright_field_mask, virtual_bf
    from ..quality.sure import sure_sigma

    if (root / "run" / "run.json").exists():  # a --workdir kept from an earlier call: finish or reuse its run
        store = zarr.open_array(str(root / "noisy.zarr"), mode="r")
    else:
        store = create_cube(root / "noisy.zarr", None, noisy.shape, 8, noisy.dtype, overwrite=True)
        store[...] = noisy
    s = sure_sigma(virtual_bf(store, bright_field_mask(store)))
    overrides = {"train": {"epochs": args.epochs}} if args.epochs else {}
    paths = run_denoise(root / "noisy.zarr", root / "run", cfg.load(args.config, overrides),
                        resume=(root / "run" / "run.json").exists(), overrides=overrides)
    out = {"raw": noisy,
           "gaussian s=1": baselines.gaussian(store, 1.0).compute(),
           "gaussian SURE": baselines.gaussian(store, s).compute() if s else noisy,
           "pca-8": baselines.pca(store, 8).compute(),
           "stemdist": zarr.open_array(str(paths.final), mode="r")[...]}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, s


def run(args: argparse.Namespace) -> int:
    from .. import console
    from ..quality.metrics import find_masks

    console.QUIET = True
    clean_npy = args.data / "srtio3_clean.npy"
    if not clean_npy.exists():
        print(f"bench downstream: {clean_npy} not found - it needs the shared SrTiO3 cubes (--data)")
        return 2
    if args.smoke:
        args.scan_crop, args.config, args.iterations = args.scan_crop or 12, args.config or "smoke", 2
        args.doses = args.doses if args.doses != list(DOSES) else [100]
    crop = slice(0, args.scan_crop)
    clean = np.load(clean_npy, mmap_mode="r")[crop, crop].astype(np.float32)
    masks = find_masks(clean.mean(axis=(0, 1)))
    exe, why = py4dstem_python()
    results: dict[tuple[int, str], dict[str, float]] = {}
    sigmas = {}
    with common.workdir(args.workdir, "stemdist-bench-downstream-") as root:
        for dose in args.doses:
            noisy = np.load(args.data / f"srtio3_dose{dose}.npy", mmap_mode="r")[crop, crop]
            folder = root / f"dose{dose}"
            folder.mkdir(parents=True, exist_ok=True)
            cubes, sigmas[dose] = method_cubes(np.ascontiguousarray(noisy), folder, args)
            cubes["truth"] = clean * dose
            images = {name: hyperspy_images(c, masks.center, masks.bf_radius, (masks.adf_inner, masks.adf_outer))
                      for name, c in cubes.items()}
            p4 = None
            if exe:
                p4dir = folder / "p4"
                p4dir.mkdir(exist_ok=True)
                for name, c in cubes.items():
                    np.save(p4dir / f"{name.replace(' ', '_').replace('=', '')}.npy", c)
                proc = subprocess.run([exe, "-c", PY4DSTEM_SCRIPT, str(p4dir), str(args.iterations), str(ENERGY),
                                       str(SEMIANGLE), str(SCAN_STEP), str(MRAD_PER_PX)], capture_output=True,
                                      text=True, env={**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    why = "py4DSTEM failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
                else:
                    p4 = {name: dict(np.load(p4dir / f"{name.replace(' ', '_').replace('=', '')}.p4.npz"))
                          for name in cubes}
            for name in METHODS:
                row = {k: error(images[name][k], images["truth"][k]) for k in HS_COLUMNS}
                if p4 is not None:
                    for col, key in zip(P4_COLUMNS, ("com_y", "com_x", "dpc", "ptycho"), strict=True):
                        row[col] = error(p4[name][key], p4["truth"][key])
                results[dose, name] = row
    columns = list(HS_COLUMNS) + (list(P4_COLUMNS) if exe and p4 is not None else [])
    print(f"downstream benchmark: SrTiO3 {clean.shape[0]}x{clean.shape[1]} scan, doses {args.doses}, stemdist "
          f"config {args.config or 'default'}; error = RMS(result - truth's result) / std(truth's result)")
    rows, wins, pairs = [], 0, 0
    for dose in args.doses:
        best = {c: min(results[dose, m][c] for m in METHODS) for c in columns}
        for name in METHODS:
            label = f"{name} ({sigmas[dose]:g})" if name == "gaussian SURE" else name
            rows.append([dose, label] + [f"{results[dose, name][c]:.3f}" + (" *" if results[dose, name][c] == best[c]
                                                                               else "") for c in columns])
        wins += sum(results[dose, "stemdist"][c] == best[c] for c in columns)
        pairs += len(columns)
    print(common.table(["dose", "method"] + columns, rows))
    if len(columns) == len(HS_COLUMNS):
        print(f"py4DSTEM columns skipped: {why}")
    print(f"stemdist has the lowest error in {wins} of {pairs} (dose, analysis) pairs (* marks each column's best)")
    return 0
