"""benchmarks/gpu/pd_ttft.py in its --smoke mode (tiny model, CPU): a mixed cluster and a prefill +
decode cluster each serve every load without a failure, and the table gives the difference of
their TTFTs for each concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "pd_ttft.py"


def test_the_pd_ttft_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out_json = tmp_path / "pd_ttft.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out_json.read_text())
    for mode in ("mixed", "pd"):
        for load in report["runs"][mode]["loads"].values():
            assert (load["completed"], load["failed"]) == (4, 0), load
    added = {row["concurrency"]: row for row in report["added"]}
    assert sorted(added) == ["1", "2"]
    for row in added.values():  # the difference is of the two measured means
        want = row["pd"]["mean_ttft_ms"] - row["mixed"]["mean_ttft_ms"]
        assert abs(row["added_mean_ms"] - want) < 1e-9
        assert row["mixed"]["mean_ttft_ms"] > 0 and row["pd"]["mean_ttft_ms"] > 0
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "2"]
