"""benchmarks/gpu/tp_bench.py in its --smoke mode (tiny model, CPU, gloo): tp 2's greedy outputs
equal tp 1's and every row of its table is printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "tp_bench.py"


def test_the_tp_benchmark_runs_on_the_cpu() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tp ")]
    assert len(rows) == 6, out.stdout  # tp 1, tp 1 as TP runs, tp 2; batches 1 and 16
    assert all(row.endswith("| yes |") for row in rows), out.stdout
