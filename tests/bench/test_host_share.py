"""benchmarks/gpu/host_share.py in its --smoke mode (tiny model, CPU): the real and the stubbed
steps both run as pure decode steps at each batch, and the table and profile are printed."""

from __future__ import annotations

from tests.bench.bench_scripts import run_script


def test_the_host_share_benchmark_runs_on_the_cpu() -> None:
    out = run_script("host_share.py", "--smoke")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["1", "4"]  # pure decode at both
    assert "cProfile of 5 host-only steps at batch 4" in out.stdout
