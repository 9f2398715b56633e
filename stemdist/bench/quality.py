"""``stemdist bench quality``: the denoiser against classical baselines, scored against the truth.

Runs a configuration (``default`` unless ``--config``) on the simulated SrTiO3 cubes of
``../shared/data`` (a top-left ``--scan-crop`` of the 48 x 48 scan, truth = clean x dose; ``--materials
shared``), on `stemdist bench materials` cubes, or on a synthetic cube (``--materials synthetic``, and
what runs without ``--materials`` where the shared data is absent), then ``evaluate --baselines``; prints
one table per dose: method x (PSNR, SSIM, BF, ADF, CoM y, CoM x errors), the final cube against the best
baseline *for each column* (the ladder of scan Gaussians, SURE, neighbours, PCA, PCA + Gaussian) and its dose gains.
Goal per (dose, column): PSNR >= the best baseline's + 3 dB, errors <= 0.8 x the best baseline's.

The full protocol (10 cycles x 15 epochs, base width 24) takes hours on a CPU; the defaults here are
a shortened protocol that is stated in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..console import table
from ..quality.evaluate import HEADLINE  # the goal's columns
from .common import shared_data

SHARED = shared_data()

SHOWN = ("psnr", "psnr_interior", "ssim", "bf_err", "adf_err", "com_y_err", "com_x_err")
BUDGET = 16  # epochs of the shortened protocol, shared by its cycles


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help=f"folder of srtio3_*.npy (default: $STEMDIST_SHARED_DATA or {SHARED})")
    p.add_argument("--doses", type=float, nargs="+", default=[100.0], help="electrons per pattern")
    p.add_argument("--scan-crop", type=int, default=24, help="top-left N x N positions of the scan")
    p.add_argument("--config", default="default", help="configuration to score (name or YAML file)")
    p.add_argument("--cycles", type=int, help="train.cycles (default: the config's, at most 2)")
    p.add_argument("--epochs", type=int, help=f"train.epochs (default: {BUDGET} epochs shared by the cycles)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="train.warmup_epochs (default 2)")
    p.add_argument("--base-width", type=int, default=16, help="model.base_width (default 16)")
    p.add_argument("--full", action="store_true",
                   help="the configuration's own cycles, epochs, warm-up and width (hours on a CPU)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more overrides")
    p.add_argument("--pca-rank", type=int, default=8, help="PCA baseline rank")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="keep the runs and figures here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write every metric of every dose to this file")
    p.add_argument("--materials", nargs="+", metavar="NAME",
                   help="'shared' (the SrTiO3 cubes of --data), 'synthetic' (stemdist's own generator) and/or "
                        "simulated cubes of `stemdist bench materials` (srtio3_024, si110_024, mos2_030, au001_032; "
                        "made first if missing, needs abTEM). Default: shared where its cubes are, else synthetic")
    p.add_argument("--materials-cache", help="where `bench materials` keeps its cubes")
    p.add_argument("--seeds", type=int, default=1, help="train each case this many times (train.seed, seed + 1, "
                   "...) and report the spread; the goal counts a pair only if every seed meets it")
    p.add_argument("--smoke", action="store_true",
                   help="CI size: a 12 x 12 synthetic scan of 16 x 16 patterns, smoke configuration")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many cases (material, dose, seed) at once, each in its own process, its log in "
                        "RUN-log.txt beside its run folder (one GPU holds dozens of these small trainings); torch "
                        "threads per job: --threads, else the CPU cores shared out")


def _simulated(args, material: str, dose: float, root: Path) -> tuple[Path, Path, str]:
    """A `bench materials` cube at ``dose``: Poisson counts drawn (seeded) from its noise-free patterns."""
    from ..io.convert import convert
    from . import materials as mat

    clean = np.load(mat.make(material, mat.cache_dir(args.materials_cache)), mmap_mode="r")
    n = min(args.scan_crop, *clean.shape[:2])
    truth = np.asarray(clean[:n, :n], np.float64) * dose
    rng = np.random.default_rng([mat.NOISE_SEED[material], int(dose)])
    tmp = root / "npy"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "noisy.npy", rng.poisson(truth).astype(np.uint16))
    np.save(tmp / "truth.npy", truth.astype(np.float32))
    convert(tmp / "noisy.npy", root / "noisy.zarr", overwrite=True)
    convert(tmp / "truth.npy", root / "truth.zarr", overwrite=True)
    m = mat.MATERIALS[material]
    return (root / "noisy.zarr", root / "truth.zarr",
            f"{m.crystal} (simulated), step {m.step} Å, {m.thickness:g} Å thick, scan [0:{n}, 0:{n}]")


def _shared_files(args, dose: float) -> tuple[Path, Path]:
    data = args.data if args.data is not None else shared_data()
    return data / f"srtio3_dose{dose:g}.npy", data / "srtio3_clean.npy"


def default_materials(args) -> list[str]:
    """``--materials``, or ``shared`` where its cubes are for every dose (``synthetic`` where they are not);
    asked for by name, the shared cubes must be there (checked here, before anything runs)."""
    from .materials import MATERIALS

    unknown = [m for m in args.materials or () if m not in ("shared", "synthetic", *MATERIALS)]
    if unknown:
        raise SystemExit(f"bench quality: unknown material {', '.join(unknown)}: choose from shared, synthetic, "
                         f"{', '.join(sorted(MATERIALS))}")
    missing = sorted({str(p) for dose in args.doses for p in _shared_files(args, dose) if not p.exists()})
    if not args.materials:
        return ["shared" if args.smoke or not missing else "synthetic"]
    if "shared" in args.materials and missing and not args.smoke:
        raise SystemExit(f"bench quality: the shared SrTiO3 cubes are not there: {', '.join(missing)} (point "
                         "--data or STEMDIST_SHARED_DATA at the folder of srtio3_clean.npy and srtio3_doseD.npy)")
    return list(args.materials)


def _cubes(args, dose: float, root: Path, material: str = "shared") -> tuple[Path, Path, str]:
    """``(noisy, truth, description)`` Zarr cubes for one material and dose (``--smoke``: a small synthetic
    cube whatever the material)."""
    from ..io.convert import convert
    from ..io.synth import synth

    n = args.scan_crop
    if material == "shared" and not args.smoke:
        noisy_npy, clean_npy = _shared_files(args, dose)  # there: checked by default_materials
        noisy = np.load(noisy_npy, mmap_mode="r")
        clean = np.load(clean_npy, mmap_mode="r")
        n = min(n, noisy.shape[0], noisy.shape[1])
        tmp = root / "npy"
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "noisy.npy", np.ascontiguousarray(noisy[:n, :n]))
        np.save(tmp / "truth.npy", (np.asarray(clean[:n, :n], np.float64) * dose).astype(np.float32))
        convert(tmp / "noisy.npy", root / "noisy.zarr", overwrite=True)
        convert(tmp / "truth.npy", root / "truth.zarr", overwrite=True)
        return root / "noisy.zarr", root / "truth.zarr", f"SrTiO3 {noisy_npy.name}, scan [0:{n}, 0:{n}]"
    if material not in ("shared", "synthetic") and not args.smoke:
        return _simulated(args, material, dose, root)
    scan, det = ((12, 12), (16, 16)) if args.smoke else ((n, n), (32, 32))
    synth(root / "synthetic.zarr", scan, det, dose, seed=0, overwrite=True)
    return (root / "synthetic.zarr" / "noisy", root / "synthetic.zarr" / "truth",
            f"synthetic {scan[0]} x {scan[1]} scan, {det[0]} x {det[1]} detector")


def overrides(args) -> tuple[str, dict]:
    """The configuration and overrides of the protocol."""
    from .. import config as cfg

    if args.smoke:
        config, over = "smoke", {}
    else:
        config = args.config
        cycles = args.cycles or min(cfg.load(config).train.cycles, 2)
        epochs = args.epochs or max(1, BUDGET // cycles)
        over = {} if args.full else {"train": {"cycles": cycles, "epochs": epochs,
                                               "warmup_epochs": args.warmup_epochs},
                                     "model": {"base_width": args.base_width}}
    # loader processes only cost time on a CPU; they never change the result
    over = cfg.merge(over, {"data": {"num_workers": 0}},
                 cfg.parse_overrides(args.set))
    return config, over


def protocol(config_name: str, over: dict) -> str:
    from .. import config as cfg

    c = cfg.load(config_name, over)
    sized = "auto" in (c.model.base_width, c.train.warmup_epochs, c.train.min_samples)
    return (f"config {config_name}: {c.train.cycles} cycles x {c.train.epochs} epochs "
            f"(at least {c.train.min_samples} samples per cycle"
            f"{f', at most {c.train.max_epochs} epochs' if c.train.max_epochs else ''}; "
            f"{c.train.warmup_epochs} warm-up), "
            f"base width {c.model.base_width}{f' ({cfg.AUTO_RULE})' if sized else ''}, depth {c.model.depth}, "
            f"head {c.model.head}, augment {c.train.augment}, "
            f"network: mean output of {c.train.average_epochs} epochs' networks "
            f"({f'lowest loss on {c.train.holdout:g} of the positions held out' if c.train.holdout else 'the last'}"
            f"{'' if c.train.holdout else f', every {c.train.average_every}'})"
            f"{f' x {c.train.ensemble} seeds (train.ensemble)' if c.train.ensemble > 1 else ''}"
            f"{f', one per fold of {c.train.crossfit} (train.crossfit)' if c.train.crossfit > 1 else ''}, "
            f"fusion {c.output.fuse_by if c.output.fuse else 'off'}, "
            f"target {c.train.target}, borders "
            f"{c.data.borders}, final {c.output.final}, mean/sum weights "
            f"{c.train.mean_weight}/{c.train.sum_weight}")


def format_table(methods: dict[str, dict]) -> str:
    heads = {"psnr": "PSNR dB", "psnr_interior": "PSNR int", "ssim": "SSIM", "bf_err": "BF err",
             "adf_err": "ADF err", "com_y_err": "CoMy err", "com_x_err": "CoMx err"}
    return table(["method", *(heads[c] for c in SHOWN)],
                 [[name, *(f"{m[c]:.3f}" for c in SHOWN)] for name, m in methods.items()])


def wins(best: dict[str, dict]) -> list[str]:
    """Headline columns on which the final cube meets the goal against the best baseline for that column:
    PSNR at least 3 dB above it, errors at most 0.8x its."""
    return [c for c, b in best.items() if (b["delta_db"] >= 3 if c == "psnr" else b["ratio"] <= 0.8)]


def network_margin(methods: dict[str, dict]) -> str:
    """The last cycle's PSNR (the network alone) less ``fused_mean``'s (the fusion with the mean pattern in the
    network's place): what the network adds over the classical pipeline it is fused into."""
    cycles = sorted(k for k in methods if k.startswith("cycle_"))
    if not cycles or "fused_mean" not in methods:
        return "-"
    return f"{methods[cycles[-1]]['psnr'] - methods['fused_mean']['psnr']:+.2f} dB"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load

    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config_name, over = overrides(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="stemdist-quality-"))
    print(f"protocol: {protocol(config_name, over)}")
    print(f"baselines: scan Gaussians sigma 0.5/1/1.5/2/3 and at the SURE width, the mean pattern, mean of the 8 "
          f"neighbours, PCA rank {args.pca_rank}, PCA then the SURE-width Gaussian, the mean pattern fused with the "
          "raw counts by SURE per detector region; the bar is the best of them per column")
    seed0 = load(config_name, over).train.seed
    seeds = [seed0 + k for k in range(args.seeds)]
    materials = default_materials(args)
    planned = []  # (key, dose, seed, run folder, noisy, truth, description), in the report's order
    for material, dose in [(m, d) for m in materials for d in args.doses]:
        key = f"{material}/{dose:g}" if len(materials) > 1 else dose
        root = out / (f"{material}-dose{dose:g}" if len(materials) > 1 else f"dose{dose:g}")
        noisy, truth, desc = _cubes(args, dose, root / "data", material)  # once for all its seeds
        for seed in seeds:
            seeded_key = f"{key if isinstance(key, str) else f'{key:g}'} seed {seed}" if len(seeds) > 1 else key
            planned.append((seeded_key, dose, seed, root / ("run" if len(seeds) == 1 else f"run-seed{seed}"),
                            noisy, truth, desc))
    results, failed = {}, []

    def report(key, result: dict, text: str) -> None:
        results[key] = result
        print(text, flush=True)
        if args.json:  # after every case: a run cut short keeps what it measured
            done = {k: results[k] for k, *_ in planned if k in results}
            args.json.write_text(json.dumps({"protocol": protocol(config_name, over), "doses": done}, indent=2))

    if args.jobs > 1:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = args.threads or max(1, (os.cpu_count() or 1) // min(args.jobs, len(planned)))
        print(f"{len(planned)} cases, {min(args.jobs, len(planned))} at once ({threads} torch threads each); each "
              "case's log: RUN-log.txt beside its run folder", flush=True)
        with ProcessPoolExecutor(min(args.jobs, len(planned)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_case, config_name, over, seed, run_dir, noisy, truth, desc, dose,
                                   args.pca_rank, threads, run_dir.parent / f"{run_dir.name}-log.txt"): key
                       for key, dose, seed, run_dir, noisy, truth, desc in planned}
            for future in as_completed(futures):
                try:
                    report(futures[future], *future.result())
                except Exception as exc:  # the other cases go on; the run ends with status 1, naming it
                    failed.append(f"{futures[future]}: {type(exc).__name__}: {exc}")
                    print(f"case {futures[future]} failed: {type(exc).__name__}: {exc}", flush=True)
    else:
        for key, dose, seed, run_dir, noisy, truth, desc in planned:
            report(key, *run_case(config_name, over, seed, run_dir, noisy, truth, desc, dose, args.pca_rank))
    results = {k: results[k] for k, *_ in planned if k in results}
    rows = []
    for key, r in results.items():
        best, gain = r["best_baselines"], r["dose_gain"]["final"]
        rows.append([key, *(f"{best[c]['delta_db']:+.2f} dB" if c == "psnr" else f"{best[c]['ratio']:.2f}x"
                            for c in HEADLINE), *(f"{gain[c]:.1f}x" for c in HEADLINE), network_margin(r["methods"])])
    print("\nfinal vs the best baseline for each column (goal: >= +3 dB, <= 0.8x), dose gain (x the dose), and the "
          "network alone vs fused_mean (PSNR):")
    print(table(["case", "PSNR", "BF", "ADF", "CoM y", "CoM x", "gain PSNR", "gain BF", "gain ADF", "gain CoM y",
                 "gain CoM x", "network vs fused_mean"], rows))
    cases = {}  # case -> its seeds' results
    for key, r in results.items():
        case = key.rsplit(" seed ", 1)[0] if len(seeds) > 1 else key
        cases.setdefault(case, []).append(r)
    if len(seeds) > 1:
        print(f"\nspread over seeds {', '.join(map(str, seeds))} (min .. max of the final vs the best baseline):")
        print(table(["case", "PSNR dB", "BF", "ADF", "CoM y", "CoM x", "network PSNR dB"],
                    [[case, *(_spread([r["best_baselines"][c]["delta_db" if c == "psnr" else "ratio"] for r in rs],
                                      "+.2f" if c == "psnr" else ".2f") for c in HEADLINE),
                      _spread([r["methods"]["cycle_01"]["psnr"] for r in rs if "cycle_01" in r["methods"]], ".2f")]
                     for case, rs in cases.items()]))
    met = {case: [c for c in HEADLINE if all(c in wins(r["best_baselines"]) for r in rs)] for case, rs in cases.items()}
    total = sum(len(m) for m in met.values())
    per_dose = "; ".join(f"{'dose ' if isinstance(d, float) else ''}{d if isinstance(d, str) else f'{d:g}'}: "
                         f"{', '.join(m) or 'none'}" for d, m in met.items())
    every = " by every seed" if len(seeds) > 1 else ""
    print(f"\nquality: {config_name} meets the goal against the best baseline per column (+3 dB, <= 0.8x){every} on "
          f"{total} of {len(HEADLINE) * len(cases)} (dose, column) pairs ({per_dose})")
    if failed:
        print(f"bench quality: {len(failed)} case(s) failed (their logs beside their run folders): "
              + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


def run_case(config_name: str, over: dict, seed: int, run_dir: Path, noisy: Path, truth: Path, desc: str,
             dose: float, pca_rank: int, threads: int | None = None, log: Path | None = None) -> tuple[dict, str]:
    """One case: train and predict ``noisy`` into ``run_dir`` with ``seed``, score it against ``truth`` and the
    baselines; returns the result and its report. With ``log`` (a case in a ``--jobs`` process), the run's own
    output goes there instead of the terminal."""
    import contextlib
    import io
    import os
    import shutil

    from .. import config as cfg
    from ..api import run_denoise
    from ..quality.evaluate import evaluate, summary_lines

    if threads:
        import torch

        torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if log is not None:  # file descriptors, not sys.stdout: Lightning and its warnings write there too
            log.parent.mkdir(parents=True, exist_ok=True)
            sink = stack.enter_context(open(log, "w"))
            for fd in (1, 2):
                saved = os.dup(fd)
                stack.callback(os.close, saved)
                stack.callback(os.dup2, saved, fd)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
                stack.callback(stream.flush)
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        seeded = cfg.merge(over, {"train": {"seed": seed}})
        run_denoise(noisy, run_dir, cfg.load(config_name, seeded), overrides=seeded)
        seconds = time.perf_counter() - t0
        res = evaluate(run_dir, truth, with_baselines=True, pca_rank=pca_rank)
    text = io.StringIO()
    print(f"\ndose {dose:g} e-/pattern, seed {seed}: {desc}; denoise {seconds:.0f} s; figures in "
          f"{run_dir / 'report'}", file=text)
    print(format_table(res["methods"]), file=text)
    for line in summary_lines(res):
        print(line, file=text)
    result = {"data": desc, "seed": seed, "seconds": seconds, "methods": res["methods"], "run": str(run_dir),
              "best_baselines": res["best_baselines"], "dose_gain": res["dose_gain"],
              "blind_spot": res.get("blind_spot")}
    return result, text.getvalue().rstrip("\n")


def _spread(values: list[float], fmt: str) -> str:
    """``min .. max`` of a case's values over its seeds."""
    return f"{min(values):{fmt}} .. {max(values):{fmt}}" if values else "-"
