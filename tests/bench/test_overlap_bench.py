"""benchmarks/gpu/overlap_bench.py in its --smoke mode (tiny model, CPU): it runs, checks the two
loops give the same tokens, and prints its table."""

from __future__ import annotations

from tests.bench.bench_scripts import run_script


def test_the_overlap_benchmark_runs_on_the_cpu() -> None:
    out = run_script("overlap_bench.py", "--smoke")
    assert "overlap on vs off (8 requests x 24): equal" in out.stdout
    assert "| 4 |" in out.stdout
