"""The GPU benchmark's compiled-peer rows and its attention-kernels section, run in --smoke mode on
the CPU (eager peer, pdserve's torch references in place of its Triton kernels, no FlashInfer), so a
device call does not fail on something a CPU could have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "run_gpu_bench.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_bench_peer")
    md, out_json = tmp / "BENCHMARKS.md", tmp / "bench.json"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--model-dir-root", str(tmp / "models")]
    argv += ["--sections", "ceilings,b1,batch,offline,kernels"]
    argv += ["--out-md", str(md), "--out-json", str(out_json)]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"md": md.read_text(), "json": json.loads(out_json.read_text())}


def test_every_decode_row_has_the_peer_beside_it(run: dict) -> None:
    s = run["json"]["sections"]
    assert run["json"]["errors"] == {}
    peer = s["b1"]["peer"]
    assert peer["compiled"] is False  # no torch.compile on the CPU
    assert peer["decode_step_ms"] > 0 and 0 < peer["mbu"]
    assert [b["peer"]["batch"] for b in s["batch"]["batches"]] == [2, 4]
    assert all(b["peer"]["context"] == round(b["mean_context"]) for b in s["batch"]["batches"])
    assert s["offline"]["peer"]["output_tokens"] == 4 * 8
    rows = [r for r in run["json"]["table"] if "vs compiled plain torch" in r[0]]
    assert len(rows) == 1 + 2 + 1  # b1, batch 2 and 4, offline


def test_peer_greedy_tokens_equal_pdserve_engine_in_float32(run: dict) -> None:
    check = run["json"]["sections"]["b1"]["peer"]["check"]
    assert check["passed"] and check["logits_ok"]
    assert check["logits_max_rel_err"] < 1e-4
    assert check["tokens_equal"], (check["pdserve_ids"], check["peer_ids"])
    assert "peer check `b1`" in run["md"] and "PASS" in run["md"]


def test_kernels_section_checks_and_times_without_flashinfer(run: dict) -> None:
    k = run["json"]["sections"]["kernels"]
    assert k["flashinfer"] == "flashinfer not installed"
    # 2 kinds x 2 head dims x 2 shapes, pdserve only; every one checked against float32
    assert len(k["rows"]) == 8
    assert all(r["impl"] == "pdserve" and r["ok"] and r["us"] > 0 for r in k["rows"])
    assert {(r["kind"], r["head_dim"]) for r in k["rows"]} == {
        (kind, d) for kind in ("decode", "prefill") for d in (16, 32)
    }
    kernel_rows = [r for r in run["json"]["table"] if "attention, float32," in r[0]]
    assert len(kernel_rows) == 8
    assert all(r[2] == "flashinfer not installed" for r in kernel_rows)
