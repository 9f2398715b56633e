"""``stemdist evaluate`` on a finished smoke run: metrics.json and every figure; the run's own figures."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import zarr

from stemdist.bench import quality
from stemdist.quality.evaluate import evaluate

from .conftest import run_cli

FIGURES = ("virtual_images.png", "patterns.png", "loss.png")
METRICS = ("psnr", "psnr_interior", "ssim", "rel_rmse", "bf_err", "adf_err", "com_y_err", "com_x_err")


def test_denoise_draws_the_run_figures(smoke_run):
    for name in FIGURES:
        assert (smoke_run / "report" / name).stat().st_size > 0, name


def test_evaluate_cli_writes_metrics_and_every_figure(smoke_run):
    proc = run_cli("evaluate", str(smoke_run), "--baselines", "--pca-rank", "4")
    assert "final" in proc.stdout and "gaussian_sure" in proc.stdout
    assert "final vs the best baseline for each column (goals: >= +3 dB, <= 0.8x): PSNR" in proc.stdout
    assert "final is as good as raw data at N x the dose: PSNR" in proc.stdout
    assert "the truth's neighbour mean (a blind-spot network's reference" in proc.stdout
    report = smoke_run / "report"
    m = json.loads((report / "metrics.json").read_text())
    assert 0 < m["blind_spot"]["adf_contrast"] < 1 and 0 < m["blind_spot"]["bf_err"] < 1
    assert m["against"] == "truth"  # found beside the synth cube's noisy array
    ladder = {"gaussian_0.5", "gaussian_1", "gaussian_1.5", "gaussian_2", "gaussian_3", "gaussian_sure",
              "mean_pattern", "neighbours", "pca", "pca_gaussian", "fused_mean", "fused_mean_wiener"}
    assert set(m["methods"]) == {"raw", "cycle_01", "cycle_02", "final"} | ladder
    methods = m["methods"]
    for col, best in m["best_baselines"].items():  # the bar is the best baseline for each column
        scores = {b: methods[b][col] for b in ladder}
        assert best["value"] == (max if col == "psnr" else min)(scores.values()) == scores[best["best"]]
        if col == "psnr":
            assert best["delta_db"] == pytest.approx(methods["final"]["psnr"] - best["value"])
        else:
            assert best["ratio"] == pytest.approx(methods["final"][col] / best["value"])
    gain = m["dose_gain"]
    assert gain["raw"]["bf_err"] == pytest.approx(1.0) and gain["raw"]["psnr"] == pytest.approx(1.0)
    assert gain["final"]["bf_err"] == pytest.approx((methods["raw"]["bf_err"] / methods["final"]["bf_err"]) ** 2)
    assert gain["final"]["psnr"] == pytest.approx(10 ** ((methods["final"]["psnr"] - methods["raw"]["psnr"]) / 10))
    # the bar's fused_mean is the run's own fusion (its output.fuse_sectors) with the mean pattern as the network
    final_plan = zarr.open_group(str(smoke_run / "denoised.zarr"), mode="r")["final"].attrs["fuse_plan"]
    bar_plan = zarr.open_array(str(smoke_run / "report" / "baselines.zarr" / "fused_mean_wiener")).attrs["fuse_plan"]
    assert m["baselines"]["fuse_sectors"] == 8 and len(bar_plan["sectors"]) == len(final_plan["sectors"]) == 4 * 8
    sigma = m["baselines"]["sure_sigma"]
    assert zarr.open_array(str(smoke_run / "report" / "baselines.zarr" / "gaussian_sure")).attrs["sigma"] == sigma
    for method in m["methods"].values():
        assert set(METRICS) <= set(method) and all(np.isfinite(method[k]) for k in METRICS)
    final, last = m["methods"]["final"], m["methods"]["cycle_02"]  # final = last cycle fused with raw
    assert final["bf_err"] < last["bf_err"] and final["adf_err"] < last["adf_err"]
    assert m["methods"]["gaussian_1"]["psnr"] > m["methods"]["raw"]["psnr"]
    assert m["masks"]["bf_radius"] == pytest.approx(16 / 5, abs=0.6)
    assert "*_err" in m["definitions"]
    for name in FIGURES + ("metrics_per_cycle.png",):
        assert (report / name).stat().st_size > 0, name
    for name in ladder:
        assert zarr.open_array(str(report / "baselines.zarr" / name), mode="r").attrs["complete"] is True


def test_evaluate_against_a_scaled_reference_and_set_masks(smoke_run, smoke_cube, tmp_path):
    truth = zarr.open_array(str(smoke_cube / "truth"), mode="r")
    high = tmp_path / "high.npy"
    np.save(high, np.asarray(truth[:]) * 1000)  # a "high-dose" cube 1000 x the raw dose, noise-free here
    res = evaluate(smoke_run, reference=high, bf_radius=3.0, adf_inner=4.0, adf_outer=7.0, figures=False)
    assert res["against"] == "reference"
    assert res["truth"]["scale"] == pytest.approx(1e-3, rel=0.05)  # raw counts / reference counts
    assert res["masks"]["bf_radius"] == 3.0 and res["masks"]["adf_outer"] == 7.0
    vs_truth = evaluate(smoke_run, truth=smoke_cube / "truth", bf_radius=3.0, adf_inner=4.0, adf_outer=7.0,
                        figures=False)
    assert res["methods"]["final"]["psnr"] == pytest.approx(vs_truth["methods"]["final"]["psnr"], abs=0.5)


def test_evaluate_without_truth_draws_figures_only(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(smoke_run, run)
    info = json.loads((run / "run.json").read_text())
    raw = zarr.open_array(info["raw"], mode="r")
    local = zarr.create_array(store=str(run / "raw.zarr"), shape=raw.shape, chunks=raw.chunks,
                              dtype=raw.dtype)
    local[:] = raw[:]  # not beside a synth truth any more
    info["raw"] = str(run / "raw.zarr")
    (run / "run.json").write_text(json.dumps(info))
    res = evaluate(run)
    assert res["methods"] is None and res["against"] is None
    assert json.loads((run / "report" / "metrics.json").read_text())["methods"] is None
    assert {p.split("/")[-1] for p in res["figures"]} == set(FIGURES)


def test_evaluate_rejects_a_directory_without_run(tmp_path):
    proc = run_cli("evaluate", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no stemdist run" in proc.stderr


def test_bench_quality_smoke(tmp_path):
    proc = run_cli("bench", "quality", "--smoke", "--out", str(tmp_path / "q"),
                   "--json", str(tmp_path / "q.json"))
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("quality: smoke meets the goal against the best baseline per column (+3 dB, <= 0.8x)")
    assert "(dose, column) pairs (dose 100: " in last
    assert "| gaussian_sure" in proc.stdout and "protocol: config smoke" in proc.stdout
    data = json.loads((tmp_path / "q.json").read_text())
    assert set(data["doses"]["100.0"]["methods"]) >= {"raw", "final", "gaussian_1", "gaussian_sure", "neighbours",
                                                     "pca", "pca_gaussian"}
    assert set(data["doses"]["100.0"]["best_baselines"]) == {"psnr", "bf_err", "adf_err", "com_y_err", "com_x_err"}
    m = data["doses"]["100.0"]["methods"]  # the network's own margin over the classical fusion of the mean pattern
    assert "network vs fused_mean" in proc.stdout
    assert f"| {m['cycle_02']['psnr'] - m['fused_mean']['psnr']:+.2f} dB" in proc.stdout


def test_bench_quality_seeds_report_the_spread_and_count_a_pair_only_if_every_seed_meets_it(tmp_path):
    proc = run_cli("bench", "quality", "--smoke", "--seeds", "2", "--out", str(tmp_path / "q"),
                   "--json", str(tmp_path / "q.json"))
    data = json.loads((tmp_path / "q.json").read_text())["doses"]
    assert set(data) == {"100 seed 0", "100 seed 1"} and [r["seed"] for r in data.values()] == [0, 1]
    assert (tmp_path / "q" / "dose100" / "run-seed0").is_dir() and (tmp_path / "q" / "dose100" / "run-seed1").is_dir()
    nets = [r["methods"]["cycle_01"]["psnr"] for r in data.values()]
    assert nets[0] != nets[1]  # two trainings, not one run reported twice
    assert "spread over seeds 0, 1" in proc.stdout
    lo, hi = sorted(r["best_baselines"]["psnr"]["delta_db"] for r in data.values())
    assert f"| {lo:+.2f} .. {hi:+.2f}" in proc.stdout
    met = [c for c in ("psnr", "bf_err", "adf_err", "com_y_err", "com_x_err")
           if all((r["best_baselines"][c]["delta_db"] >= 3) if c == "psnr" else (r["best_baselines"][c]["ratio"] <= 0.8)
                  for r in data.values())]
    last = proc.stdout.strip().splitlines()[-1]
    assert "by every seed on " in last and last.endswith(f"(100: {', '.join(met) or 'none'})")
    assert f"on {len(met)} of 5 (dose, column) pairs" in last


def test_bench_quality_jobs_run_each_case_in_its_own_process_with_the_figures_of_one_after_another(tmp_path):
    args = ("bench", "quality", "--smoke", "--doses", "20", "100", "--threads", "1")
    par = run_cli(*args, "--jobs", "2", "--out", str(tmp_path / "p"), "--json", str(tmp_path / "p.json"))
    seq = run_cli(*args, "--out", str(tmp_path / "s"), "--json", str(tmp_path / "s.json"))
    a, b = (json.loads((tmp_path / f"{name}.json").read_text())["doses"] for name in "ps")
    assert list(a) == list(b) == ["20.0", "100.0"]  # the report's order, whichever case finished first
    for dose in a:
        for method in ("final", "cycle_02", "fused_mean_wiener"):
            assert a[dose]["methods"][method] == pytest.approx(b[dose]["methods"][method], rel=1e-6), (dose, method)
    assert "2 cases, 2 at once (1 torch threads each)" in par.stdout
    for dose in ("20", "100"):  # each run's own output went to its log, not the terminal
        assert "[stemdist] run " in (tmp_path / "p" / f"dose{dose}" / "run-log.txt").read_text()
    assert "[stemdist] run " not in par.stdout + par.stderr and "[stemdist] run " in seq.stdout + seq.stderr
    assert par.stdout.strip().splitlines()[-1] == seq.stdout.strip().splitlines()[-1]
    assert run_cli(*args, "--jobs", "0", check=False).stderr.strip().endswith("--jobs must be at least 1, got 0")


def test_bench_quality_refuses_missing_shared_cubes_and_unknown_materials(tmp_path):
    """Asked for by name, the shared cubes must be there: never a synthetic cube reported under their name."""
    proc = run_cli("bench", "quality", "--materials", "shared", "--data", str(tmp_path), "--doses", "20", "100",
                   "--out", str(tmp_path / "q"), check=False)
    assert proc.returncode != 0 and "the shared SrTiO3 cubes are not there" in proc.stderr
    assert "srtio3_dose20.npy" in proc.stderr and "srtio3_dose100.npy" in proc.stderr
    assert not (tmp_path / "q" / "dose20").exists()  # refused before anything ran
    proc = run_cli("bench", "quality", "--materials", "au001", "--out", str(tmp_path / "q"), check=False)
    assert proc.returncode != 0 and "unknown material au001" in proc.stderr and "au001_032" in proc.stderr


def test_bench_quality_runs_the_shared_cubes_by_default_where_they_are_else_says_synthetic(tmp_path):
    args = argparse.Namespace(materials=None, data=tmp_path, doses=[100.0], smoke=False)
    assert quality.default_materials(args) == ["synthetic"]
    for name in ("srtio3_dose100.npy", "srtio3_clean.npy"):
        np.save(tmp_path / name, np.zeros((2, 2, 2, 2)))
    assert quality.default_materials(args) == ["shared"]
    assert quality.default_materials(argparse.Namespace(**{**vars(args), "doses": [20.0]})) == ["synthetic"]
