"""`pdserve bench serve` against a fake streaming server whose tokens, delays and failures are known."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdserve.bench.datasets import random_text_requests, random_token_requests, token_pool
from pdserve.tiny_model import build_tiny_model


def _serve(
    run_bench: Any, fake: Any, tmp_path: Path, *extra: str, fail: bool = False
) -> dict[str, Any]:
    fake.reset(fail_pattern=fail)
    out = tmp_path / "result.json"
    argv = ["serve", "--base-url", fake.base_url, "--tokenizer", "none", "--disable-tqdm"]
    argv += ["--input-len", "8", "--output-len", "5", "--output-json", str(out), *extra]
    assert run_bench(argv) == 0
    return json.loads(out.read_text())


def test_serve_counts_tokens_and_failed_requests(
    run_bench: Any, fake_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = _serve(run_bench, fake_server, tmp_path, "--num-prompts", "10", fail=True)
    # Of 10 requests, 2 get HTTP 500 and 2 an error event after two chunks.
    assert (result["completed"], result["failed"], result["num_requests"]) == (6, 4, 10)
    assert result["total_output_tokens"] == 6 * 5
    assert result["total_input_tokens"] == 6 * 8  # from the fake's usage.prompt_tokens
    errors = {'HTTP 500: {"error":{"message":"overloaded"}}': 2, "error event: boom": 2}
    assert result["errors"] == errors
    first_delay = fake_server.FIRST_DELAY_S
    ok = [i for i, e in enumerate(result["errors_per_request"]) if e is None]
    assert all(result["ttfts"][i] >= first_delay for i in ok)
    assert result["num_itl"] == 6 * 4
    assert result["model_id"] == "fake-model"  # asked /v1/models
    assert result["config"]["request_rate"] == "inf"
    table = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in table
    assert "Failed requests:                         4" in table


def test_serve_asks_for_exact_streamed_lengths(
    run_bench: Any, fake_server: Any, tmp_path: Path
) -> None:
    _serve(run_bench, fake_server, tmp_path, "--num-prompts", "4", "--api-key", "sk-x")
    assert len(fake_server.bodies) == 4
    for body in fake_server.bodies:
        assert body["max_tokens"] == body["min_tokens"] == 5
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert len(body["prompt"]) == 8 and all(0 <= t < 256 for t in body["prompt"])
    assert fake_server.auth_headers == ["Bearer sk-x"] * 4


def test_serve_without_usage_counts_token_chunks_and_times_them(
    run_bench: Any, fake_server: Any, tmp_path: Path
) -> None:
    result = _serve(
        run_bench,
        fake_server,
        tmp_path,
        "--num-prompts",
        "6",
        "--endpoint",
        "/nousage/v1/completions",
    )
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["output_lens"] == [5] * 6
    assert result["input_lens"] == [8] * 6  # the dataset's lengths when the server gives none
    first_ms, gap_ms = fake_server.FIRST_DELAY_S * 1000, fake_server.GAP_S * 1000
    assert result["mean_ttft_ms"] >= first_ms
    # Four gaps of GAP_S each after the first token; sleeps never end early.
    assert result["mean_tpot_ms"] >= gap_ms * 0.9
    assert result["mean_e2el_ms"] >= (first_ms + 4 * gap_ms) * 0.95


def test_max_concurrency_caps_requests_in_flight(
    run_bench: Any, fake_server: Any, tmp_path: Path
) -> None:
    result = _serve(
        run_bench, fake_server, tmp_path, "--num-prompts", "8", "--max-concurrency", "2"
    )
    assert result["completed"] == 8
    assert fake_server.max_in_flight == 2


def test_poisson_arrivals_spread_requests_over_time(
    run_bench: Any, fake_server: Any, tmp_path: Path
) -> None:
    rate, num, seed = 40.0, 8, 3
    args = ["--num-prompts", str(num), "--request-rate", str(rate), "--seed", str(seed)]
    result = _serve(run_bench, fake_server, tmp_path, *args)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num - 1)
    assert result["completed"] == num
    assert result["duration_s"] >= gaps.sum() + fake_server.FIRST_DELAY_S


def test_unreachable_server_fails_every_request(run_bench: Any, tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    out = tmp_path / "r.json"
    argv = ["serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--tokenizer"]
    argv += ["none", "--num-prompts", "3", "--disable-tqdm", "--output-json", str(out)]
    assert run_bench(argv) == 1
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (0, 3)
    assert all(e.startswith("ConnectError") for e in result["errors_per_request"])


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    model_dir = build_tiny_model(tmp_path_factory.mktemp("bench_tok") / "llama", arch="llama")
    return AutoTokenizer.from_pretrained(model_dir)


def test_random_text_prompts_reencode_to_their_length(tiny_tokenizer: Any) -> None:
    requests = random_text_requests(tiny_tokenizer, 20, 48, 4, range_ratio=0.5, seed=0)
    lens = [r.prompt_len for r in requests]
    assert all(24 <= n <= 72 for n in lens) and len(set(lens)) > 1
    assert all(1 <= r.output_len <= 6 for r in requests)
    for r in requests:
        assert isinstance(r.prompt, str)
        assert len(tiny_tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
    exact = random_text_requests(tiny_tokenizer, 20, 48, 4, range_ratio=0.0, seed=1)
    assert sum(r.prompt_len == 48 for r in exact) >= 18


def test_random_token_prompts_avoid_special_tokens(tiny_tokenizer: Any) -> None:
    pool = token_pool(tiny_tokenizer)
    requests = random_token_requests(10, 16, 8, 0.0, seed=0, pool=pool)
    special = set(tiny_tokenizer.all_special_ids)
    assert all(len(r.prompt) == r.prompt_len == 16 and r.output_len == 8 for r in requests)
    assert not any(t in special for r in requests for t in r.prompt)
    again = random_token_requests(10, 16, 8, 0.0, seed=0, pool=pool)
    assert [r.prompt for r in again] == [r.prompt for r in requests]  # the seed decides


def test_serve_sends_text_built_with_the_served_models_tokenizer(
    run_bench: Any, fake_server: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    fake_server.reset()
    fake_server.model_root = tiny_tokenizer.name_or_path  # a local directory, as vLLM lists it
    out = tmp_path / "r.json"
    argv = ["serve", "--base-url", fake_server.base_url, "--num-prompts", "3", "--input-len"]
    argv += ["24", "--output-len", "2", "--disable-tqdm", "--output-json", str(out)]
    try:
        assert run_bench(argv) == 0
    finally:
        fake_server.model_root = None
    result = json.loads(out.read_text())
    assert result["tokenizer"] == tiny_tokenizer.name_or_path
    assert result["completed"] == 3
    for body in fake_server.bodies:
        assert isinstance(body["prompt"], str)
        assert len(tiny_tokenizer.encode(body["prompt"], add_special_tokens=False)) == 24
