"""LoRA end to end on a real prefill + decode cluster (CPU, tcp KV transfer) launched with two
adapters: greedy text per adapter from the openai client and /generate equals the in-process
engine's (which tests/worker/test_lora_vs_peft.py checks against peft); live load, use, unload,
also while other requests stream, leaking no KV page and no adapter slot. A mixed worker with the
prefix cache on serves the same texts, base and adapter rows in one batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import pytest
from e2e_clusters import start_cluster
from lora_adapters import ADAPTER_SPECS, make_adapter, make_adapters

from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "once upon a time there"]
MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e_adapters")
    made = make_adapters(tiny_llama, root)
    made["gamma"] = make_adapter(tiny_llama, root / "gamma", seed=9, **ADAPTER_SPECS["gamma"])
    return made


@pytest.fixture(scope="module")
def lora_cluster(tiny_llama: Path, adapters: dict[str, Path]) -> Iterator[Cluster]:
    paths = [f"alpha={adapters['alpha']}", str(adapters["beta"])]  # beta: named by its folder
    cluster = start_cluster(
        tiny_llama,
        "pd",
        kv_transfer="tcp",
        lora_paths=paths,
        max_lora_rank=8,
        max_loras_per_batch=2,
    )
    yield cluster
    cluster.stop(grace_s=1)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, adapters: dict[str, Path]) -> dict[str | None, list[str]]:
    """Greedy texts of each prompt from the in-process engine, per adapter (None: base)."""
    engine = Engine(
        str(tiny_llama),
        in_process=True,
        device="cpu",
        num_pages=256,
        page_size=4,
        lora_paths=[f"{n}={p}" for n, p in adapters.items()],
    )
    out = {
        lora: [r["text"] for r in engine.generate(PROMPTS, GREEDY, lora_path=lora)]
        for lora in (None, "alpha", "beta", "gamma")
    }
    engine.shutdown()
    return out


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def _complete(cluster: Cluster, model: str) -> list[str]:
    out = _client(cluster).completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_openai_model_names_pick_adapters_and_match_the_engine(
    lora_cluster: Cluster, reference: dict[str | None, list[str]]
) -> None:
    model = lora_cluster.topology.model_name
    assert reference["alpha"] != reference[None] and reference["beta"] != reference[None]
    assert _complete(lora_cluster, model) == reference[None]
    assert _complete(lora_cluster, "alpha") == reference["alpha"]
    assert _complete(lora_cluster, f"{model}:beta") == reference["beta"]
    models = openai.OpenAI(base_url=f"{lora_cluster.url}/v1", api_key="x").models.list()
    parents = {m.id: getattr(m, "parent", None) for m in models.data}
    assert parents == {model: None, "alpha": model, "beta": model}


def test_generate_batch_mixes_base_and_adapters(
    lora_cluster: Cluster, reference: dict[str | None, list[str]]
) -> None:
    loras = ["alpha", None, "beta", "alpha"]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    body = {"text": prompts, "sampling_params": GREEDY, "lora_path": loras}
    items = httpx.post(f"{lora_cluster.url}/generate", json=body, timeout=60).json()
    want = [reference[lora][PROMPTS.index(p)] for lora, p in zip(loras, prompts)]
    assert [it["text"] for it in items] == want
    bad = httpx.post(f"{lora_cluster.url}/generate", json={**body, "lora_path": "nope"})
    assert bad.status_code == 400 and "nope" in bad.text


def test_a_mixed_worker_with_the_prefix_cache_serves_every_adapter_in_one_batch(
    tiny_llama: Path, adapters: dict[str, Path], reference: dict[str | None, list[str]]
) -> None:
    paths = [f"alpha={adapters['alpha']}", f"beta={adapters['beta']}"]
    cluster = start_cluster(
        tiny_llama, "mixed", lora_paths=paths, max_lora_rank=8, enable_prefix_cache=True
    )
    try:
        model = cluster.topology.model_name
        assert _complete(cluster, "alpha") == reference["alpha"]
        assert _complete(cluster, f"{model}:beta") == reference["beta"]
        # Every prompt again, base and adapters in one batch: prefixes cached under one adapter
        # must not be reused for another.
        loras = ["alpha", None, "beta", "alpha", "beta", None]
        prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[1]]
        body = {"text": prompts, "sampling_params": GREEDY, "lora_path": loras}
        items = httpx.post(f"{cluster.url}/generate", json=body, timeout=60).json()
        want = [reference[lora][PROMPTS.index(p)] for lora, p in zip(loras, prompts)]
        assert [it["text"] for it in items] == want
    finally:
        cluster.stop(grace_s=1)


def test_live_load_use_unload(
    lora_cluster: Cluster, adapters: dict[str, Path], reference: dict[str | None, list[str]]
) -> None:
    url = lora_cluster.url
    load = {"lora_name": "gamma", "lora_path": str(adapters["gamma"])}
    reply = httpx.post(f"{url}/load_lora_adapter", json=load, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["loaded_adapters"] == ["alpha", "beta", "gamma"]
    assert _complete(lora_cluster, "gamma") == reference["gamma"]
    card = httpx.get(f"{url}/v1/models/gamma", timeout=10).json()  # OpenAI's retrieve
    assert card["id"] == "gamma" and card["root"] == str(adapters["gamma"]) and card["parent"]
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=60)  # vLLM's path
    assert again.status_code == 400 and "already loaded" in again.json()["error_message"]
    missing = {"lora_name": "delta", "lora_path": str(adapters["gamma"]) + "-missing"}
    failed = httpx.post(f"{url}/load_lora_adapter", json=missing, timeout=60)
    assert failed.status_code == 400 and "adapter_config.json" in failed.json()["error_message"]
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert gone.status_code == 200 and gone.json()["loaded_adapters"] == ["alpha", "beta"]
    with pytest.raises(openai.BadRequestError, match="gamma"):
        _complete(lora_cluster, "gamma")
    unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert unknown.status_code == 404
    assert httpx.get(f"{url}/v1/models/gamma", timeout=10).status_code == 404


# ---------------------------------------------------------------------- live changes under load

STREAM_NEW = 384  # tokens of each background stream: they outlast the load/use/unload below
GAMMA_NEW = 48  # tokens of the adapter request that the unload has to wait for


class StreamResult(NamedTuple):
    text: str
    finish_reason: str | None


def _stream(
    cluster: Cluster, model: str, prompt: str, max_tokens: int, started: threading.Event
) -> StreamResult:
    """A greedy streamed completion; sets `started` at its first chunk (it holds pages then)."""
    chunks = _client(cluster).completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text, finish = [], None
    for chunk in chunks:
        started.set()
        for choice in chunk.choices:
            text.append(choice.text)
            finish = choice.finish_reason or finish
    return StreamResult("".join(text), finish)


def _start(
    pool: ThreadPoolExecutor, cluster: Cluster, jobs: list[tuple[str, str]], max_tokens: int
) -> list[Future[StreamResult]]:
    """Start a stream per (model, prompt) on `pool` at once; return once every one streams."""
    started = [threading.Event() for _ in jobs]
    futures = [
        pool.submit(_stream, cluster, model, prompt, max_tokens, event)
        for (model, prompt), event in zip(jobs, started)
    ]
    for job, event in zip(jobs, started):
        if not event.wait(60):
            raise AssertionError(f"no first chunk from {job}")
    return futures


def _wait_idle(cluster: Cluster, num_adapters: int, within_s: float = 10.0) -> list[dict]:
    """The workers' load reports once they show nothing running or queued, every page free or
    only cached, no adapter slot held and `num_adapters` loaded; the last ones on timeout."""
    deadline = time.monotonic() + within_s
    while True:
        workers = httpx.get(f"{cluster.url}/server_info", timeout=5).json()["workers"]
        is_idle = all(
            w["num_running_reqs"] == 0
            and w["num_queue_reqs"] == 0
            and w["num_free_pages"] == w["num_total_pages"]
            and w["num_adapter_slots_used"] == 0
            and w["num_loaded_adapters"] == num_adapters
            for w in workers
        )
        if is_idle or time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


def test_live_load_use_unload_while_streams_run_leaks_nothing(
    lora_cluster: Cluster, adapters: dict[str, Path], reference: dict[str | None, list[str]]
) -> None:
    url = lora_cluster.url
    model = lora_cluster.topology.model_name
    background = [(m, p) for m in (model, "alpha") for p in PROMPTS] * 2  # 8 streams
    gamma_job = ("gamma", PROMPTS[1])
    with ThreadPoolExecutor(len(background) + 1) as pool:
        alone = {  # each distinct request, run on its own first
            job: _start(pool, lora_cluster, [job], STREAM_NEW)[0].result()
            for job in dict.fromkeys(background)
        }
        assert len({r.text for r in alone.values()}) == 4  # alpha changes the text

        running = _start(pool, lora_cluster, background, STREAM_NEW)
        assert not any(f.done() for f in running)
        load = {"lora_name": "gamma", "lora_path": str(adapters["gamma"])}
        loaded = httpx.post(f"{url}/load_lora_adapter", json=load, timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["loaded_adapters"] == ["alpha", "beta", "gamma"]
        assert _complete(lora_cluster, "gamma") == reference["gamma"]
        [gamma_first] = [f.result() for f in _start(pool, lora_cluster, [gamma_job], GAMMA_NEW)]

        # Unloading while a request uses gamma waits for it (were gamma dropped under it, its
        # next step would fail), then succeeds; the request ends untouched.
        [gamma] = _start(pool, lora_cluster, [gamma_job], GAMMA_NEW)
        is_gamma_done_at_unload = gamma.done()
        num_streaming_at_unload = sum(not f.done() for f in running)
        gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
        assert gone.status_code == 200, gone.text
        assert gone.json()["loaded_adapters"] == ["alpha", "beta"]
        assert not is_gamma_done_at_unload and num_streaming_at_unload > 0
        assert gamma.result(timeout=60) == gamma_first and gamma_first.finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="gamma"):
            _complete(lora_cluster, "gamma")
        body = {"text": PROMPTS[0], "sampling_params": GREEDY, "lora_path": "gamma"}
        refused = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert refused.status_code == 400 and "gamma" in refused.text

        results = [f.result(timeout=60) for f in running]
    assert results == [StreamResult(alone[job].text, "length") for job in background]

    workers = _wait_idle(lora_cluster, num_adapters=2)
    for w in workers:
        assert w["num_running_reqs"] == 0 and w["num_queue_reqs"] == 0, w
        assert w["num_free_pages"] == w["num_total_pages"], w
        assert w["num_adapter_slots_used"] == 0 and w["num_loaded_adapters"] == 2, w
