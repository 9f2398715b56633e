"""The benchmarks run end to end in their CI-sized form and end with their headline line."""

from __future__ import annotations

import re

import pytest

from .conftest import run_cli

HEADLINES = {
    "loader": r"loader ratio \d+\.\d+ \(goal >= 2\)",
    "infer": r"infer ratio \d+\.\d+ \(goal >= 0\.8\)",
    "train": r"train data-wait \d+\.\d+% \(goal <= 5%\)",
    "memory": r"memory growth -?\d+\.\d+% \(goal <= 10%\)",
}


@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_bench_smoke_ends_with_its_headline(name, tmp_path):
    proc = run_cli("bench", name, "--smoke", "--workdir", str(tmp_path))
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    assert re.fullmatch(HEADLINES[name], lines[-1]), proc.stdout
    assert any(line.startswith("|") for line in lines)  # the table of measured figures
