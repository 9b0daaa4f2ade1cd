"""benchmarks/gpu/overlap_bench.py in its --smoke mode (tiny model, CPU): it runs, checks the two
loops give the same tokens, and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "overlap_bench.py"


def test_the_overlap_benchmark_runs_on_the_cpu() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "overlap on vs off (8 requests x 24): equal" in out.stdout
    assert "| 4 |" in out.stdout
