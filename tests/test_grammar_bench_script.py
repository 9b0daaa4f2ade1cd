"""benchmarks/gpu/grammar_bench.py in its --smoke mode (tiny shapes, CPU), so that the call on the
GPU machine does not fail on something a CPU could have caught. Its main() runs in the test
process (tests/bench_script_runner.py): a process of its own spent half the test importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_script_runner import run_script_main

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "grammar_bench.py"


def test_grammar_bench_smoke_measures_every_mode_in_pure_decode(tmp_path: Path) -> None:
    args = ["--smoke", "--compare-accept", "--compare-draw-graphs", "--compare-graph-feed"]
    args += ["--phases"]
    args += ["--root", str(tmp_path / "models")]
    proc = run_script_main(SCRIPT, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((tmp_path / "grammar_bench.json").read_text())
    plain = [False, True, False, True]
    assert [r["constrained"] for r in results] == plain + [True] * 2 + plain + plain
    suffixes = [r["mode"][r["mode"].find(" (") :] if " (" in r["mode"] else "" for r in results]
    assert suffixes == [""] * 4 + [" (accept on the fill thread)"] * 2 + [" (eager draws)"] * 4 + [
        " (no graph feed)"
    ] * 4  # fmt: skip
    assert "host us/step" in proc.stdout and "wait for the fill thread" in proc.stdout
    assert all(r["pure_decode"] and r["step_ms"] > 0 and r["batch"] == 8 for r in results)
    assert all((r["bitmask_fill_us"] is not None) == r["constrained"] for r in results)
    md = (tmp_path / "grammar_bench.md").read_text()
    assert "| greedy, JSON schema |" in md and md in proc.stdout
