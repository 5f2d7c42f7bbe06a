"""benchmarks/gpu_check.sh works before anyone spends GPU time on it: without CUDA it runs its whole
path (plain diffusers, the engine eager, compiled cold and from the cache) on a tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_and_prints_its_table():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--size", "64", "--steps", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row.split("|")[2].strip(): row for row in done.stdout.splitlines() if row.startswith("| tiny/z-image")}
    assert set(rows) == {"plain diffusers", "engine, eager", "engine, compiled", "weights on rank 0"}, done.stdout
    for run in ("plain diffusers", "engine, eager", "engine, compiled"):
        assert float(rows[run].split("|")[3]) > 0, rows[run]
    cold, read, built = map(int, re.search(r"cold [\d.]+ s \((\d+) graphs\); from the cache [\d.]+ s \((\d+) of "
                                           r"(\d+) read\)", rows["engine, compiled"]).groups())
    assert cold > 0 and read == built > 0, rows["engine, compiled"]  # a second start compiles nothing new
    assert "transformer" in rows["weights on rank 0"]
