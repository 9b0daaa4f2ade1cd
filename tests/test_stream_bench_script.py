"""The smooth-streams GPU benchmark (benchmarks/gpu/stream_bench.py) run end to end in its --smoke
mode (tiny shapes, CPU, a mixed worker), so that its GPU call does not fail on what a CPU could
have caught. Its main() runs in the test process (tests/bench_script_runner.py): a process of its
own, and each of its client processes re-importing it as their __main__, spent most of the
test's time importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_script_runner import run_script_main

pytestmark = pytest.mark.slow  # starts a process tree and client processes

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "stream_bench.py"


def test_smoke_run_measures_the_steady_and_burst_loads(
    tmp_path: Path, bench_model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: with PDSERVE_PROFILE_DIR set, each worker leaves its loop's cProfile there."""
    monkeypatch.setenv("PDSERVE_PROFILE_DIR", str(tmp_path / "profiles"))
    out_json = tmp_path / "stream.json"
    argv = ["--smoke", "--modes", "mixed"]
    argv += ["--model-dir-root", str(bench_model_root), "--out-json", str(out_json)]
    proc = run_script_main(SCRIPT, argv)
    assert proc.returncode == 0, proc.stdout[-3000:]
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
    import pstats

    profile = tmp_path / "profiles" / "mixed0.pstats"  # the last cluster's: the first one's too
    calls = {func[2] for func in pstats.Stats(str(profile)).stats}  # type: ignore[attr-defined]
    assert "_step" in calls and "_emit" in calls
