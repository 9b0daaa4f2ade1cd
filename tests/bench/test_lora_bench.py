"""benchmarks/gpu/lora_bench.py in its --smoke mode (tiny model, CPU): every engine decodes, the
folded and the split (old) LoRA paths side by side with the base model, and the table is printed."""

from __future__ import annotations

from pathlib import Path

from tests.bench.bench_scripts import run_script


def test_the_lora_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out = run_script("lora_bench.py", "--smoke", timeout=900, env={"OUT": str(tmp_path)})
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    engines = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert engines.count("base model") == 1 and len(rows) == 9, out.stdout
    assert {"LoRA folded, 8 slots", "LoRA split (old), 8 slots"} <= set(engines), out.stdout
    assert all("not pure decode" not in row for row in rows), out.stdout
    summary = next(line for line in out.stdout.splitlines() if "target 80%" in line)
    assert summary.count("%,") == 3, summary  # the four engines with graphs, eager left out
    assert (tmp_path / "lora_bench.json").is_file()
