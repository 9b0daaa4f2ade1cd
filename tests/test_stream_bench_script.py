"""The smooth-streams GPU benchmark (benchmarks/gpu/stream_bench.py) run end to end in its --smoke
mode (tiny shapes, CPU, a mixed worker), so that its GPU call does not fail on what a CPU could
have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a process tree and client processes

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "stream_bench.py"


def test_smoke_run_measures_the_steady_and_burst_loads(tmp_path: Path) -> None:
    out_json = tmp_path / "stream.json"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--modes", "mixed"]
    argv += ["--model-dir-root", str(tmp_path / "models"), "--out-json", str(out_json)]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["errors"] == []
    (run,) = report["runs"]
    assert (run["mode"], run["decode_step_prefill_tokens"]) == ("mixed", 64)
    assert (run["steady"]["completed"], run["steady"]["failed"]) == (6, 0)
    assert (run["burst"]["completed"], run["burst"]["failed"]) == (12, 0)
    for load in (run["steady"], run["burst"]):
        assert load["mean_tpot_ms"] > 0 and load["p90_itl_ms"] > 0
        assert {"router", "tokenizer0", "mixed0"} <= set(load["cpu_us_per_output_token"])
    assert run["itl_p90_over_tpot"] > 0 and run["burst_over_steady_tpot"] > 0
    assert "mean TPOT burst / steady" in proc.stdout
