"""Speculative decoding end to end on CPU: a prefill + decode cluster over tcp whose decode worker
speculates with an EAGLE head (its prompt's KV and last hidden states came from the prefill
worker) on a pool small enough to preempt, and the in-process Engine with NGRAM: greedy outputs
equal the non-speculative engine's token for token, /generate's meta_info carries
spec_verify_ct, /metrics the accepted tokens per step, and every page comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

# Token prompts that repeat themselves (prompt lookup finds drafts), and plain ones.
PROMPTS = [[5, 6, 7, 8] * 4, [40, 41] * 6 + [9], [100, 200, 300], [77] * 5]
PARAMS = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> list[list[int]]:
    engine = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=512)
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)]


@pytest.fixture(scope="module")
def eagle_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pdserve.tiny_model.eagle import build_tiny_eagle_head

    return build_tiny_eagle_head(tmp_path_factory.mktemp("eagle_e2e") / "head", seed=3)


@pytest.fixture(scope="module")
def eagle_pd_cluster(tiny_llama: Path, eagle_head: Path) -> Iterator[Cluster]:
    topology = Topology.for_model(
        str(tiny_llama),
        mode="pd",
        device="cpu",
        port=_free_port(),
        kv_transfer="tcp",
        num_pages=16,  # 64 tokens for 4 requests of up to 41 (11 pages): any two overlapping preempt
        page_size=4,
        speculative_algorithm="EAGLE",
        speculative_draft_model_path=str(eagle_head),
        speculative_num_steps=3,
        speculative_num_draft_tokens=4,
    )
    cluster = Cluster(topology, log_level="warning", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=1)


def test_in_process_engine_with_ngram_equals_the_plain_engine(
    tiny_llama: Path, reference: list[list[int]]
) -> None:
    engine = Engine(
        str(tiny_llama),
        in_process=True,
        device="cpu",
        num_pages=512,
        speculative_algorithm="NGRAM",
        speculative_num_draft_tokens=5,
    )
    outs = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
    assert [o["output_ids"] for o in outs] == reference
    counts = [o["meta_info"]["spec_verify_ct"] for o in outs]
    assert all(0 < n <= 23 for n in counts), counts  # the first token is the prefill's


def test_eagle_on_the_decode_worker_equals_the_plain_engine(
    eagle_pd_cluster: Cluster, reference: list[list[int]]
) -> None:
    url = eagle_pd_cluster.url
    res = httpx.post(
        f"{url}/generate", json={"input_ids": PROMPTS, "sampling_params": PARAMS}, timeout=120
    )
    res.raise_for_status()
    outs = res.json()
    assert [o["output_ids"] for o in outs] == reference
    for o in outs:
        assert 0 < o["meta_info"]["spec_verify_ct"] <= 23, o["meta_info"]
    # Every page comes back, and the decode worker reports its verify rows.
    deadline = time.monotonic() + 30
    while True:
        workers = httpx.get(f"{url}/server_info", timeout=5).json()["workers"]
        idle = all(w["num_running_reqs"] == 0 and w["num_free_pages"] == w["num_total_pages"]
                   for w in workers)  # fmt: skip
        metrics = {
            f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        }
        if idle and "pdserve_spec_accept_length" in metrics:
            break
        assert time.monotonic() < deadline, (workers, sorted(metrics))
        time.sleep(0.2)
    (sample,) = [s for s in metrics["pdserve_spec_accept_length"].samples]
    assert sample.labels["role"] == "decode" and sample.value >= 1.0
    decode = next(w for w in workers if w["role"] == "decode")
    assert decode["num_preemptions"] > 0, decode


def test_eagle_example_runs(
    tiny_llama: Path,
    eagle_head: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The EAGLE example with --in-process, run as __main__ in this process with its command line
    (a process of its own would spend most of its time importing torch and transformers)."""
    from tests.example_runner import run_example_in_process

    script = "engine/offline_batch_inference_eagle.py"
    args = ["--model", str(tiny_llama), "--draft-model", str(eagle_head), "--device", "cpu",
            "--in-process"]  # fmt: skip
    out = run_example_in_process(script, args, monkeypatch, capsys)
    assert out.count("===============================") == 4, out
    assert out.count("Tokens per verify step: ") == 4, out


def test_spec_bench_smoke_run(tiny_llama: Path) -> None:
    """benchmarks/gpu/spec_bench.py's CPU smoke mode: forced acceptance is what it measures."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks/gpu/spec_bench.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--tiny", "--model", str(tiny_llama),
           "--batches", "2", "--accept", "3", "--new-tokens", "13"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny | 2 | k=4")]
    # 12 tokens after the first: 4 steps of exactly 3 tokens each, the plain run's tokens.
    assert len(rows) == 1 and "| 3 | 3.00 |" in rows[0] and rows[0].endswith("| yes |"), rows
