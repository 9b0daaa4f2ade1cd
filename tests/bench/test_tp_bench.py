"""benchmarks/gpu/tp_bench.py in its --smoke mode (tiny model, CPU, gloo): tp 2's greedy outputs
equal tp 1's and every row of its table is printed."""

from __future__ import annotations

from tests.bench.bench_scripts import run_script


def test_the_tp_benchmark_runs_on_the_cpu() -> None:
    out = run_script("tp_bench.py", "--smoke")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tp ")]
    assert len(rows) == 6, out.stdout  # tp 1, tp 1 as TP runs, tp 2; batches 1 and 16
    assert all(row.endswith("| yes |") for row in rows), out.stdout
