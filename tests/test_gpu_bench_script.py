"""The one-call GPU benchmark script, run end to end in its --smoke mode (tiny shapes, CPU), so that
the call on the GPU machine does not fail on something a CPU could have caught: every default
section, the compiled-peer rows beside each decode row (an eager peer on the CPU), and the
attention-kernels section (pdserve's torch references in place of its Triton kernels, no
FlashInfer). Its main() runs in the test process (tests/bench_script_runner.py), twice: the
default sections, and the kernels section; its own children (clusters, the transformers and KV
helpers) are processes as on the GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_script_runner import run_script_main

pytestmark = pytest.mark.slow  # starts process trees (the serving section)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "run_gpu_bench.py"


def run_smoke(tmp: Path, model_root: Path, *flags: str) -> dict:
    md, out_json = tmp / "BENCHMARKS.md", tmp / "bench.json"
    argv = ["--smoke", "--model-dir-root", str(model_root)]
    argv += [*flags, "--out-md", str(md), "--out-json", str(out_json)]
    proc = run_script_main(SCRIPT, argv)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return {"md": md.read_text(), "json": json.loads(out_json.read_text()), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, bench_model_root: Path) -> dict:
    """The default sections, as the GPU machine's call runs them (peers on)."""
    return run_smoke(tmp_path_factory.mktemp("gpu_bench"), bench_model_root)


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory: pytest.TempPathFactory, bench_model_root: Path) -> dict:
    """The kernels section, opt-in on the CPU (no engine, no cluster)."""
    tmp = tmp_path_factory.mktemp("gpu_bench_kernels")
    return run_smoke(tmp, bench_model_root, "--sections", "kernels")


def test_every_cpu_section_runs_without_error(smoke_run: dict) -> None:
    data = smoke_run["json"]
    assert data["errors"] == {}
    assert set(data["skipped"]) == {"hf_static"}  # transformers compiles only on CUDA
    expected = {"ceilings", "b1", "batch", "offline", "hf", "kv", "b1_8b", "nano", "serve"}
    assert set(data["sections"]) == expected


def test_engine_sections_generate_the_requested_tokens(smoke_run: dict) -> None:
    s = smoke_run["json"]["sections"]
    assert s["b1"]["output_tokens"] == 12 and s["b1_8b"]["output_tokens"] == 12
    # The tied model reads its embedding table (lm_head); the untied one skips its lookup table.
    assert s["b1"]["bytes_per_step"] == s["b1_8b"]["bytes_per_step"]
    assert [b["batch"] for b in s["batch"]["batches"]] == [2, 4]
    assert all(b["is_pure_decode"] for b in s["batch"]["batches"])
    assert s["offline"]["output_tokens"] == 12 * 8
    assert s["hf"]["output_tokens"] == 4 * 8
    assert s["nano"]["generated_tokens"] == s["nano"]["total_tokens"] > 0


def test_kv_pages_land_intact_and_serving_completes_every_request(smoke_run: dict) -> None:
    s = smoke_run["json"]["sections"]
    assert s["kv"]["checksum_matches"]
    assert [r["size_bytes"] for r in s["kv"]["sizes"]] == [4096, 16384]
    for mode in ("mixed", "pd"):
        run = s["serve"][mode]
        assert (run["completed"], run["failed"]) == (6, 0)
        assert run["mean_tpot_ms"] > 0  # tokens arrived one chunk at a time, as text
    assert s["serve"]["pd"]["kv_transfer"] == "tcp"


def test_table_and_command_are_written(smoke_run: dict) -> None:
    md = smoke_run["md"]
    assert "| what | pdserve | reference | ratio | target |" in md
    assert "run_gpu_bench.py --smoke" in md
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(smoke_run["json"]["table"])
    assert smoke_run["md"] in smoke_run["stdout"]  # printed last, too


def test_every_decode_row_has_the_peer_beside_it(smoke_run: dict) -> None:
    s = smoke_run["json"]["sections"]
    peer = s["b1"]["peer"]
    assert peer["compiled"] is False  # no torch.compile on the CPU
    assert peer["decode_step_ms"] > 0 and 0 < peer["mbu"]
    assert s["b1_8b"]["peer"]["decode_step_ms"] > 0
    assert [b["peer"]["batch"] for b in s["batch"]["batches"]] == [2, 4]
    assert all(b["peer"]["context"] == round(b["mean_context"]) for b in s["batch"]["batches"])
    assert s["offline"]["peer"]["output_tokens"] == 4 * 8
    rows = [r for r in smoke_run["json"]["table"] if "vs compiled plain torch" in r[0]]
    assert len(rows) == 1 + 2 + 1 + 1  # b1, batch 2 and 4, b1_8b, offline


def test_peer_greedy_tokens_equal_pdserve_engine_in_float32(smoke_run: dict) -> None:
    check = smoke_run["json"]["sections"]["b1"]["peer"]["check"]
    assert check["passed"] and check["logits_ok"]
    assert check["logits_max_rel_err"] < 1e-4
    assert check["tokens_equal"], (check["pdserve_ids"], check["peer_ids"])
    assert "peer check `b1`" in smoke_run["md"] and "PASS" in smoke_run["md"]


def test_kernels_section_checks_and_times_without_flashinfer(kernels_run: dict) -> None:
    assert kernels_run["json"]["errors"] == {}
    k = kernels_run["json"]["sections"]["kernels"]
    assert k["flashinfer"] == "flashinfer not installed"
    # 2 kinds x 2 head dims x 2 shapes, pdserve only; every one checked against float32
    assert len(k["rows"]) == 8
    assert all(r["impl"] == "pdserve" and r["ok"] and r["us"] > 0 for r in k["rows"])
    assert {(r["kind"], r["head_dim"]) for r in k["rows"]} == {
        (kind, d) for kind in ("decode", "prefill") for d in (16, 32)
    }
    kernel_rows = [r for r in kernels_run["json"]["table"] if "attention, float32," in r[0]]
    assert len(kernel_rows) == 8
    assert all(r[2] == "flashinfer not installed" for r in kernel_rows)
