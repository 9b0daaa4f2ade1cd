"""Poisoned requests mixed into a load of innocent ones, on a real CPU prefill + decode cluster:
every poisoned request gets a clean 4xx with OpenAI's error body, and every innocent request
completes with exactly the tokens it gets without the poison (issue 10: one client used to fail
other clients' requests, because a bad parameter failed the batched sampler's whole step)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

MODEL = "llama"  # the tiny model's directory name is its served name
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
USER = [{"role": "user", "content": "Tell me about the lighthouse."}]

INNOCENT: list[tuple[str, dict[str, Any]]] = [
    *[("/generate", {"text": f"Request {i} says", "sampling_params": GREEDY}) for i in range(8)],
    *[
        (
            "/v1/completions",
            {"model": MODEL, "prompt": f"The keeper {i}", "max_tokens": 8, "temperature": 0},
        )
        for i in range(4)
    ],  # fmt: skip
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0}),
    ("/generate", {"input_ids": [5, 17, 42, 99], "sampling_params": GREEDY}),
]


def _gen(**sampling: Any) -> tuple[str, dict[str, Any]]:
    return ("/generate", {"text": "poison", "sampling_params": {**GREEDY, **sampling}})


def _chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    return ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 8, **fields})


POISONED: dict[str, tuple[str, dict[str, Any]]] = {
    "logit_bias past the vocabulary": _chat(logit_bias={"100000": 5}),
    "logit_bias at the vocabulary size": _gen(logit_bias={"512": 5}),
    "logit_bias negative id": _chat(logit_bias={"-1": 5}),
    "logit_bias huge value": _chat(logit_bias={"5": 1e9}),
    "stop_token_ids past the vocabulary with min_tokens": _chat(
        stop_token_ids=[100000], min_tokens=4
    ),
    "stop_token_ids at the vocabulary size with min_new_tokens": _gen(
        stop_token_ids=[512], min_new_tokens=3
    ),
    "seed of 2**64": _chat(seed=2**64, temperature=0.7),
    "seed overflowing with n": _gen(seed=2**64 - 1, n=2, temperature=0.7),
    "input_ids past the vocabulary": (
        "/generate",
        {"input_ids": [5, 600], "sampling_params": GREEDY},
    ),
    "input_ids past int64": ("/generate", {"input_ids": [5, 2**70], "sampling_params": GREEDY}),
    "prompt token id negative": ("/v1/completions", {"model": MODEL, "prompt": [5, -3]}),
    "top_k past int64": _gen(top_k=2**70, temperature=0.7),
    "nan temperature": _gen(temperature=float("nan")),
    "max_tokens past the context": _chat(max_tokens=2**40),
    "min_tokens over max_tokens": _chat(min_tokens=20),
    "stop not a string": _gen(stop=7),
    "lone surrogate in the prompt": ("/v1/completions", {"model": MODEL, "prompt": "ok \ud800"}),
    "lone surrogate in stop": _gen(stop=["ok \ud800"]),
    "top_logprobs over 20": _chat(logprobs=True, top_logprobs=21),
    "streamed logit_bias past the vocabulary": _chat(logit_bias={"100000": 5}, stream=True),
}


@pytest.fixture(scope="module")
def cluster(pd_cluster: Cluster) -> Cluster:
    """The session's prefill + decode cluster over tcp (conftest.py), shared with the other
    end-to-end tests: the poison must leave it serving them."""
    return pd_cluster


def output_of(path: str, resp: httpx.Response) -> Any:
    """What an innocent request produced: token ids where the route gives them, else text."""
    body = resp.json()
    if path == "/generate":
        return body["output_ids"]
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def send_all(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        sends = [client.post(path, content=json.dumps(body).encode()) for path, body in requests]
        return await asyncio.gather(*sends)


def test_poisoned_requests_get_4xx_and_innocent_ones_are_unaffected(cluster: Cluster) -> None:
    alone = asyncio.run(send_all(cluster.url, INNOCENT))
    assert [r.status_code for r in alone] == [200] * len(INNOCENT), [r.text for r in alone]
    expected = [output_of(path, r) for (path, _), r in zip(INNOCENT, alone)]
    assert all(expected)

    # Three rounds of the innocent load with every poison interleaved.
    poison = list(POISONED.items())
    mixed: list[tuple[str | None, tuple[str, dict[str, Any]]]] = []
    for _ in range(3):
        for i, innocent in enumerate(INNOCENT):
            mixed.append((None, innocent))
            for name, req in poison[i :: len(INNOCENT)]:
                mixed.append((name, req))
    responses = asyncio.run(send_all(cluster.url, [req for _, req in mixed]))

    outputs: list[Any] = []
    for (name, (path, _)), resp in zip(mixed, responses):
        if name is None:
            assert resp.status_code == 200, resp.text
            outputs.append(output_of(path, resp))
            continue
        assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text[:300])
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
    assert outputs == expected * 3
    assert {name for name, _ in mixed if name} == set(POISONED)  # every poison was sent

    info = httpx.get(f"{cluster.url}/server_info", timeout=10).json()
    assert info["num_requests_in_flight"] == 0


def test_token_checks_name_the_parameter(cluster: Cluster) -> None:
    for (path, body), param in [
        (POISONED["logit_bias past the vocabulary"], "logit_bias"),
        (POISONED["stop_token_ids past the vocabulary with min_tokens"], "stop_token_ids"),
        (POISONED["input_ids past the vocabulary"], "input_ids"),
    ]:
        resp = httpx.post(f"{cluster.url}{path}", json=body, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
