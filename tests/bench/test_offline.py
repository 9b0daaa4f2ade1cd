"""`pdserve bench offline` on a tiny model on CPU: every request yields exactly its output length."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.offline import _sampling
from pdserve.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bench_offline") / "llama", arch="llama")


def test_offline_generates_every_requested_token(
    run_bench: Any, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "offline.json"
    argv = ["offline", "--model", str(tiny_llama_dir), "--num-prompts", "8"]
    argv += ["--input-len", "16", "--output-len", "8", "--device", "cpu", "--num-pages", "256"]
    argv += ["--warmup", "1", "--output-json", str(out)]
    assert run_bench(argv) == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 8
    assert result["total_input_tokens"] == 8 * 16
    assert result["total_output_tokens"] == 8 * 8
    assert result["output_throughput"] == pytest.approx(64 / result["duration_s"])
    assert result["engine_options"]["num_pages"] == 256
    assert result["engine_options"]["device"] == "cpu"
    table = capsys.readouterr().out
    assert "Total generated tokens:                  64" in table


def test_offline_rejects_bad_engine_option(run_bench: Any, tiny_llama_dir: Path) -> None:
    argv = ["offline", "--model", str(tiny_llama_dir), "--num-prompts", "1", "--page-size", "0"]
    with pytest.raises(ValueError, match="page_size=0"):
        run_bench(argv + ["--device", "cpu"])


def test_offline_asks_for_exactly_the_output_length_greedily() -> None:
    params = _sampling(BenchRequest(prompt=[5, 6], prompt_len=2, output_len=7))
    assert params == {"max_new_tokens": 7, "ignore_eos": True, "temperature": 0.0}
