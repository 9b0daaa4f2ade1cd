"""benchmarks/gpu/vlm_bench.py in its --smoke mode (the same checkpoint writer at tiny shapes, a
prefill + decode cluster on the CPU): every request of 1 and of 4 images completes, and the
table and the JSON hold one row per images-per-request count."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.bench_scripts import run_script


def test_the_vlm_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out = run_script("vlm_bench.py", "--smoke", "--out-dir", str(tmp_path))
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "4"], out.stdout
    result = json.loads((tmp_path / "vlm_bench.json").read_text())
    assert [(r["images_per_request"], r["failed"]) for r in result["rows"]] == [(1, 0), (4, 0)]
    for row in result["rows"]:
        assert row["completed"] == result["plan"]["num_requests"]
        assert 0 < row["ttft_p50_ms"] <= row["e2e_mean_ms"] * 2
        assert row["images_per_s"] == row["requests_per_s"] * row["images_per_request"]
