"""benchmarks/gpu/compile_watch.py in its --smoke mode (tiny model, CPU, no Triton compiles to
see): both rounds of the closed loop finish every request and the report is printed."""

from __future__ import annotations

from tests.bench.bench_scripts import run_script


def test_the_compile_watch_runs_on_the_cpu() -> None:
    out = run_script("compile_watch.py", "--smoke")
    rounds = [line for line in out.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all(line.startswith(f"round {i}: 6/6 requests") for i, line in
                                    zip((1, 2), rounds)), rounds  # fmt: skip
    assert out.stdout.count("slowest steps:") == 2
