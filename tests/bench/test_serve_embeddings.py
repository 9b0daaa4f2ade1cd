"""`pdserve bench serve --endpoint embeddings`: the payload, counting and failures against the fake
server, and a real mixed-worker cluster of the tiny embedding model on CPU."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.cli import endpoint_path
from pdserve.entrypoints.launch import Cluster


def _embed(run_bench: Any, base_url: str, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["serve", "--base-url", base_url, "--endpoint", "embeddings", "--disable-tqdm"]
    argv += ["--output-json", str(out), *extra]
    assert run_bench(argv) == 0
    return json.loads(out.read_text())


def test_endpoint_shorthands() -> None:
    assert endpoint_path("embeddings") == "/v1/embeddings"
    assert endpoint_path("chat") == "/v1/chat/completions"
    assert endpoint_path("/custom/v1/embeddings") == "/custom/v1/embeddings"


def test_embeddings_mode_sends_one_input_per_request_and_counts_failures(
    run_bench: Any, fake_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fake_server.reset(fail_pattern=True)
    args = ["--tokenizer", "none", "--input-len", "8", "--num-prompts", "10"]
    args += ["--max-concurrency", "3", "--encoding-format", "base64"]
    result = _embed(run_bench, fake_server.base_url, tmp_path / "r.json", *args)
    assert (result["completed"], result["failed"]) == (8, 2)  # every 5th answers HTTP 500
    assert result["total_input_tokens"] == 8 * 8 and result["total_output_tokens"] == 0
    assert result["input_throughput"] == pytest.approx(64 / result["duration_s"])
    assert result["mean_e2el_ms"] >= fake_server.EMBED_DELAY_S * 1000
    assert fake_server.max_in_flight == 3
    for body in fake_server.bodies:
        assert set(body) == {"model", "input", "encoding_format"}
        assert body["encoding_format"] == "base64" and len(body["input"]) == 8
    table = capsys.readouterr().out
    assert "========== Embeddings Benchmark Result ===========" in table
    assert "Failed requests:                         2" in table
    assert "P99 latency (ms):" in table and "TTFT" not in table


@pytest.fixture(scope="module")
def embedding_cluster() -> Iterator[Cluster]:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import _free_port
    from pdserve.tiny_model.pooling_models import cached_tiny_pooling_model

    model = cached_tiny_pooling_model("embedding")
    topology = Topology.for_model(
        str(model), mode="mixed", device="cpu", port=_free_port(), num_pages=512, page_size=4
    )
    cluster = Cluster(topology, log_level="warning", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=1)


@pytest.mark.slow
def test_embeddings_mode_against_the_tiny_embedding_model(
    run_bench: Any, embedding_cluster: Cluster, tmp_path: Path
) -> None:
    """Text prompts built with the served model's tokenizer (its `root` at /v1/models)."""
    args = ["--input-len", "32", "--num-prompts", "12", "--max-concurrency", "4"]
    result = _embed(
        run_bench, embedding_cluster.url, tmp_path / "r.json", *args, "--num-warmups", "1"
    )
    assert (result["completed"], result["failed"]) == (12, 0), result["errors"]
    assert result["tokenizer"] is not None  # text prompts, not token ids
    # The server counts the prompt as it tokenizes it (plus a BOS when the tokenizer adds one).
    assert all(32 <= n <= 34 for n in result["input_lens"])
    assert result["request_throughput"] > 0 and result["input_throughput"] > 0
    assert result["input_throughput"] == pytest.approx(
        result["total_input_tokens"] / result["duration_s"]
    )
    assert 0 < result["median_e2el_ms"] <= result["p90_e2el_ms"] <= result["p99_e2el_ms"]
    assert result["p99_e2el_ms"] < 1000 * result["duration_s"]
