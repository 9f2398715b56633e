"""Simulated 4D-STEM cubes of other crystals and geometries, for judging quality on data like real scans.

The shared SrTiO3 cubes step 0.081 Å, so neighbouring patterns are nearly the centre's; real
atomic-resolution scans step 0.2-0.4 Å. These cubes are made once by abTEM multislice (frozen phonons)
and cached: ``MATERIAL.npy`` holds the noise-free patterns, each normalised to sum 1 (probabilities), as
``srtio3_clean.npy`` does; the bench draws Poisson counts at each dose from them (truth = clean x dose).

``stemdist bench materials [--only NAME ...] [--cache DIR]`` makes the missing ones (needs abTEM:
``pip install "stemdist[simulate]"``); ``stemdist bench quality --materials`` scores on them. Each has a
``_wide`` twin, the same geometry over twice the unit cells in y and x (4x the positions), made only when
named: on a 32 x 32 crop a network trains ~60 passes over each position, on a real scan ~1, and the two
do not rank methods alike (README, Quality: wider fields).
Geometry of each (thickness, step, energy, convergence, defocus, detector) is in :data:`MATERIALS`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

DET, MRAD_PER_PX = 64, 1.5  # every cube's detector: 64 x 64 pixels of 1.5 mrad (as the shared data)


@dataclass(frozen=True)
class Material:
    crystal: str  # what ``_atoms`` builds
    cells: tuple[int, int]  # unit cells across the scanned field (y, x)
    thickness: float  # Å
    step: float  # scan step, Å
    energy: float = 300e3  # eV
    semiangle: float = 20.0  # mrad
    defocus: float = 0.0  # Å
    phonon_configs: int = 2
    phonon_sigma: float = 0.08  # Å


MATERIALS = {  # sized for a CPU: ~25-35 positions across, tens of Å thick, two frozen-phonon configurations
    "srtio3_024": Material("SrTiO3 [001]", (2, 2), 40.0, 0.24),
    "si110_024": Material("Si [110]", (2, 1), 40.0, 0.24, defocus=-30.0),
    "mos2_030": Material("MoS2 [001] monolayer", (2, 3), 6.0, 0.30, energy=80e3, semiangle=25.0),
    "au001_032": Material("Au [001]", (2, 2), 30.0, 0.32, semiangle=22.0, defocus=20.0),
}
CPU_SIZED = tuple(MATERIALS)  # what ``bench materials`` makes without ``--only``
MATERIALS |= {f"{name}_wide": replace(m, cells=(2 * m.cells[0], 2 * m.cells[1])) for name, m in MATERIALS.items()}
# the seed of each material's Poisson draws: fixed, so that adding a material changes no other's counts
NOISE_SEED = {"au001_032": 0, "mos2_030": 1, "si110_024": 2, "srtio3_024": 3,
              "au001_032_wide": 4, "mos2_030_wide": 5, "si110_024_wide": 6, "srtio3_024_wide": 7}
SAMPLING = 0.08  # Å: the potential's grid; antialiased to ~80 mrad at 300 kV, beyond the detector's 48


def _atoms(crystal: str, thickness: float):
    """The periodic orthogonal cell of ``crystal``, stacked to ``thickness`` along the beam (z)."""
    import abtem
    import ase
    from ase.build import bulk, mx2, surface

    if crystal == "SrTiO3 [001]":
        a = 3.905
        cell = ase.Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (.5, .5, .5), (.5, .5, 0), (.5, 0, .5), (0, .5, .5)],
                         cell=[a, a, a], pbc=True)
    elif crystal == "Si [110]":
        cell = abtem.orthogonalize_cell(surface(bulk("Si", "diamond", a=5.431, cubic=True), (1, 1, 0), 1,
                                                periodic=True))
    elif crystal == "MoS2 [001] monolayer":
        cell = abtem.orthogonalize_cell(mx2("MoS2", "2H", a=3.18, thickness=3.19, vacuum=1.0))
        cell.pbc = True
        return cell
    elif crystal == "Au [001]":
        cell = bulk("Au", "fcc", a=4.078, cubic=True)
    else:
        raise ValueError(f"unknown crystal {crystal!r}")
    return cell * (1, 1, max(1, round(thickness / cell.cell[2, 2])))


def simulate(m: Material) -> np.ndarray:
    """Noise-free patterns ``(scan_y, scan_x, DET, DET)``, each summing to 1."""
    import abtem
    from scipy import ndimage

    abtem.config.set({"device": "cpu", "fft": "fftw" if _has("pyfftw") else "numpy"})
    unit = _atoms(m.crystal, m.thickness)
    atoms = unit * (m.cells[1], m.cells[0], 1)  # ase cell axes: x, y
    phonons = abtem.FrozenPhonons(atoms, num_configs=m.phonon_configs, sigmas=m.phonon_sigma, seed=1)
    potential = abtem.Potential(phonons, sampling=SAMPLING, slice_thickness=2.0, projection="infinite")
    probe = abtem.Probe(energy=m.energy, semiangle_cutoff=m.semiangle, defocus=m.defocus)
    extent = atoms.cell.lengths()[:2]
    scan = abtem.GridScan(start=(0, 0), end=tuple(extent), sampling=m.step)
    detector = abtem.PixelatedDetector(max_angle=DET / 2 * MRAD_PER_PX * 1.1)
    result = probe.scan(potential, scan=scan, detectors=detector).compute(progress_bar=False)
    data = np.asarray(result.array, np.float64)  # (scan_x, scan_y, kx, ky) in abTEM's order
    sampling = np.asarray(result.angular_sampling)  # mrad per pixel (kx, ky)
    centre = (np.asarray(data.shape[2:]) - 1) / 2
    # resample onto DET x DET pixels of MRAD_PER_PX, centred on the optical axis
    k = (np.arange(DET) - (DET - 1) / 2) * MRAD_PER_PX
    ky, kx = np.meshgrid(k / sampling[1] + centre[1], k / sampling[0] + centre[0], indexing="ij")
    out = np.empty(data.shape[1::-1] + (DET, DET), np.float32)
    for i in range(data.shape[1]):
        for j in range(data.shape[0]):
            out[i, j] = ndimage.map_coordinates(data[j, i].T, [ky, kx], order=1, mode="constant")
    out = np.clip(out, 0, None)
    return (out / out.sum(axis=(2, 3), keepdims=True)).astype(np.float32)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cache_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("STEMDIST_MATERIALS", Path.home() / ".cache" / "stemdist" / "materials"))


def make(name: str, cache: Path) -> Path:
    """``cache/NAME.npy`` (and its ``.json`` description), simulated unless already there."""
    path = cache / f"{name}.npy"
    if path.exists():
        return path
    if not _has("abtem"):
        from ..errors import InputError

        raise InputError(f"{path} is not made yet and abTEM is not installed to make it: "
                         'pip install "stemdist[simulate]", then stemdist bench materials')
    m = MATERIALS[name]
    t0 = time.perf_counter()
    clean = simulate(m)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, clean)
    os.replace(partial, path)
    (cache / f"{name}.json").write_text(json.dumps({**asdict(m), "shape": list(clean.shape), "det_mrad_per_px":
                                                    MRAD_PER_PX, "seconds": round(time.perf_counter() - t0, 1)},
                                                   indent=2))
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", choices=sorted(MATERIALS),
                   help=f"which materials (default: {', '.join(CPU_SIZED)}; the _wide ones only when named)")
    p.add_argument("--cache", help="where the cubes are kept (default: $STEMDIST_MATERIALS or "
                                   "~/.cache/stemdist/materials)")


def run(args: argparse.Namespace) -> int:
    if not _has("abtem"):
        print('bench materials: abTEM is not installed - pip install "stemdist[simulate]"')
        return 2
    cache = cache_dir(args.cache)
    names = args.only or sorted(CPU_SIZED)
    for name in names:
        t0 = time.perf_counter()
        path = make(name, cache)
        shape = np.load(path, mmap_mode="r").shape
        print(f"{name}: {MATERIALS[name].crystal}, step {MATERIALS[name].step} Å, {shape} -> {path} "
              f"({time.perf_counter() - t0:.0f} s)")
    print(f"materials: {len(names)} cubes in {cache}")
    return 0
