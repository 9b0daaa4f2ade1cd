"""The OpenAI client against `launch` with a prefill and a decode worker over tcp (CPU)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there, how are you?", "The quick brown fox", "Über café 東京 😀", "a"]
CHAT = [[{"role": "user", "content": p}] for p in PROMPTS]
MAX_TOKENS = 10


def server_info(cluster: Cluster) -> dict:
    return httpx.get(f"{cluster.url}/server_info", timeout=5).json()


def workers_idle(cluster: Cluster) -> bool:
    """Every worker reports no running or queued request and all pages free or evictable."""
    workers = server_info(cluster)["workers"]
    return all(
        w["num_running_reqs"] == 0
        and w["num_queue_reqs"] == 0
        and w["num_free_pages"] == w["num_total_pages"]
        for w in workers
    )


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> dict[str, list[str]]:
    """Greedy texts from the in-process engine: the same core, no processes, no transfer."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    engine = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=512)
    params = {"temperature": 0, "max_new_tokens": MAX_TOKENS}
    completions = [o["text"] for o in engine.generate(PROMPTS, params)]
    chat_texts = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CHAT
    ]
    chat_ids = [tok.encode(t, add_special_tokens=False) for t in chat_texts]
    chats = [o["text"] for o in engine.generate(input_ids=chat_ids, sampling_params=params)]
    return {"completions": completions, "chat": chats}


def run_openai(cluster: Cluster, stream: bool) -> dict[str, list[str]]:
    c = client(cluster)
    completions, chats = [], []
    for prompt, messages in zip(PROMPTS, CHAT):
        if stream:
            chunks = c.completions.create(
                model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            completions.append("".join(ch.choices[0].text for ch in chunks if ch.choices))
            chunks = c.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            chats.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
        else:
            res = c.completions.create(
                model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            completions.append(res.choices[0].text)
            res = c.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            chats.append(res.choices[0].message.content)
    return {"completions": completions, "chat": chats}


MODEL = "llama"  # the tiny model's directory name is its served name


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_outputs_match_engine_and_mixed_worker(
    pd_cluster: Cluster, mixed_cluster: Cluster, reference: dict[str, list[str]], stream: bool
) -> None:
    assert run_openai(pd_cluster, stream) == reference
    assert run_openai(mixed_cluster, stream) == reference


def test_64_concurrent_streams_complete_and_free_every_page(pd_cluster: Cluster) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.completions.create(
            model=MODEL,
            prompt=f"Request number {i} says",
            max_tokens=12,
            stream=True,
            temperature=0.8,
            seed=i,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def all_of_them() -> list[int]:
        c = openai.AsyncOpenAI(base_url=f"{pd_cluster.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(64)))

    assert asyncio.run(all_of_them()) == [12] * 64
    deadline = time.monotonic() + 3
    while not workers_idle(pd_cluster):
        assert time.monotonic() < deadline, server_info(pd_cluster)["workers"]
        time.sleep(0.1)


def test_client_disconnect_frees_pages_on_both_workers(pd_cluster: Cluster) -> None:
    body = {
        "model": MODEL,
        "prompt": "Tell me a very long story",
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{pd_cluster.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        deadline = time.monotonic() + 3
        while not any(
            w["num_running_reqs"] > 0 and w["role"] == "decode"
            for w in server_info(pd_cluster)["workers"]
        ):
            assert time.monotonic() < deadline, "the decode worker never reported the request"
            time.sleep(0.05)
    closed = time.monotonic()
    while not workers_idle(pd_cluster):
        assert time.monotonic() - closed < 1.0, server_info(pd_cluster)["workers"]
        time.sleep(0.05)


BAD_BODIES = {
    "unknown model": ("/v1/completions", {"model": "nope", "prompt": "hi"}),
    "prompt longer than the context": (
        "/v1/completions",
        {"model": MODEL, "prompt": "hello " * 3000},
    ),
    "temperature out of range": (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
    ),
    "top_p out of range": ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2}),
    "n zero": ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}),
    "no messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    "max_tokens negative": ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}),
}


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_bad_input_gets_400_with_openai_error_body(pd_cluster: Cluster, kind: str) -> None:
    path, body = BAD_BODIES[kind]
    res = httpx.post(f"{pd_cluster.url}{path}", json=body, timeout=30)
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["message"] and error["type"]
    ok = httpx.post(
        f"{pd_cluster.url}/v1/completions",
        json={"model": MODEL, "prompt": "still serving?", "max_tokens": 2},
        timeout=30,
    )
    assert ok.status_code == 200


def test_malformed_json_gets_400(pd_cluster: Cluster) -> None:
    res = httpx.post(
        f"{pd_cluster.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert res.status_code == 400
    assert "error" in res.json()


def _counter(families: list, name: str) -> float:
    return sum(s.value for f in families for s in f.samples if s.name == name)


def test_metrics_parse_and_count_the_requests_sent(pd_cluster: Cluster) -> None:
    def scrape() -> list:
        text = httpx.get(f"{pd_cluster.url}/metrics", timeout=10).text
        return list(text_string_to_metric_families(text))

    before = scrape()
    c = client(pd_cluster)
    for i in range(5):
        c.completions.create(
            model=MODEL,
            prompt=f"count {i}",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    after = scrape()
    done = _counter(after, "pdserve_requests_total") - _counter(before, "pdserve_requests_total")
    tokens = _counter(after, "pdserve_generation_tokens_total") - _counter(
        before, "pdserve_generation_tokens_total"
    )
    assert done == 5
    assert tokens == 20
    names = {f.name for f in after}
    for name in (
        "pdserve_time_to_first_token_seconds",
        "pdserve_e2e_request_latency_seconds",
        "pdserve_inter_token_latency_seconds",
        "pdserve_num_running_reqs",
        "pdserve_kv_transfer_bytes",
    ):
        assert name in names, sorted(names)
