"""benchmarks/gpu/pd_ttft.py in its --smoke mode (tiny model, CPU): a mixed cluster and a prefill +
decode cluster each serve every load without a failure, and the table gives the difference of
their TTFTs for each concurrency."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.bench_scripts import run_script


def test_the_pd_ttft_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out_json = tmp_path / "pd_ttft.json"
    out = run_script("pd_ttft.py", "--smoke", "--out-json", str(out_json))
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
