"""benchmarks/gpu/draw_launch_bench.py in its --smoke mode (CPU, small shapes): every piece that
runs on the CPU is timed and its row printed."""

from __future__ import annotations

from tests.bench.bench_scripts import run_script


def test_the_draw_launch_bench_runs_on_the_cpu() -> None:
    out = run_script("draw_launch_bench.py", "--smoke")
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| what | host us / call |"
    assert len(rows) == 9, rows  # the eight CPU pieces (the bare graph replay needs CUDA)
    for row in rows[1:]:
        assert float(row.rsplit("|", 2)[1]) > 0, row
