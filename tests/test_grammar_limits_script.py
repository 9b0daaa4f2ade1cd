"""benchmarks/grammar_limits.py --quick runs in the test process (the figures behind the grammar
limits; the full run is the script's): its table has a row per schema, with the JSON depth that
grammar_check measures."""

from __future__ import annotations

from pathlib import Path

from bench_script_runner import run_script_main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "grammar_limits.py"


def test_the_grammar_limits_table_is_printed() -> None:
    run = run_script_main(SCRIPT, ["--quick"])
    assert run.returncode == 0
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == [
        "100 optional properties", "500 optional properties", "16 nested objects",
        "64 nested objects",
    ]  # fmt: skip
    assert [int(r[2]) for r in rows[1:]] == [3, 3, 33, 129]
    assert all(float(r[3]) >= 0 and float(r[4]) >= 0 for r in rows[1:])
