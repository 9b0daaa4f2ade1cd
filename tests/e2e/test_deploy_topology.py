"""deploy/topologies/1p1d-cpu.yaml runs as shipped (its model where `pdserve demo` keeps it), and
the cluster it starts answers /tokenize, /detokenize, get_server_info and flush_cache."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import _free_port
from pdserve.entrypoints.process_engine import ProcessEngine

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "topologies" / "1p1d-cpu.yaml"
LONG_IDS = list(range(40, 90))  # 50 tokens: three full pages of 16 for the prefix cache


@pytest.fixture(scope="module")
def home(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home directory holding the tiny model where `pdserve demo` builds it."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_llama, home / ".cache" / "pdserve" / "tiny-llama")
    return home


@pytest.fixture(scope="module")
def engine(home: Path) -> Iterator[ProcessEngine]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # the file's `~`; the children start with it too
        started = Engine(topology=SHIPPED, port=_free_port())  # the file's router, moved
    assert isinstance(started, ProcessEngine)
    yield started
    started.shutdown()


def test_the_shipped_cpu_topology_serves_a_chat_request(engine: ProcessEngine, home: Path):
    topology = engine.cluster.topology
    assert topology.model == str(home / ".cache" / "pdserve" / "tiny-llama")
    assert [w.name for w in topology.workers()] == ["prefill0", "decode0"]
    assert topology.kv_transfer.backend == "tcp"
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_tokenize_and_detokenize_go_through_the_tokenizer_process(
    engine: ProcessEngine, tiny_llama: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "The lighthouse keeper, ça va? 東京"
    with httpx.Client(base_url=engine.url, timeout=30) as http:
        got = http.post("/tokenize", json={"model": "tiny-llama", "prompt": text}).json()
        ids = tok.encode(text)
        assert got == {"tokens": ids, "count": len(ids), "max_model_len": 2048}
        back = http.post("/v1/detokenize", json={"model": "tiny-llama", "tokens": ids}).json()
        assert back == {"text": text, "prompt": text}
        batch = http.post("/v1/tokenize", json={"prompt": [text, "a"]}).json()
        assert batch["tokens"] == [ids, tok.encode("a")] and batch["count"] == [len(ids), 1]


def test_server_info_and_flush_cache_as_the_in_process_engine_has_them(
    engine: ProcessEngine, tiny_llama: Path
) -> None:
    engine.generate(input_ids=LONG_IDS, sampling_params={"max_new_tokens": 2})
    info = wait_for(engine, lambda w: w["name"] == "prefill0" and w["num_cached_pages"] >= 3)
    local = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=32)
    local_info = local.get_server_info()
    shared = set(local_info) - {"engine_config"}  # the process engine has `topology` instead
    assert shared <= set(info) and set(local_info["workers"][0]) <= set(info["workers"][0])
    assert (info["model_name"], info["max_context_len"]) == ("tiny-llama", 2048)
    assert {w["name"]: w["role"] for w in info["workers"]} == {
        "prefill0": "prefill",
        "decode0": "decode",
    }
    assert engine.flush_cache() is True
    wait_for(engine, lambda w: w["num_cached_pages"] == 0, every_worker=True)


def wait_for(
    engine: ProcessEngine, ok: Any, every_worker: bool = False, timeout_s: float = 15.0
) -> dict[str, Any]:
    """The server info once `ok` holds for some (or every) worker's load report."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = engine.get_server_info()
        reports = [w for w in info["workers"] if "num_cached_pages" in w]
        checks = [ok(w) for w in reports]
        if checks and (all(checks) if every_worker else any(checks)):
            return info
        assert time.monotonic() < deadline, info["workers"]
        time.sleep(0.2)
