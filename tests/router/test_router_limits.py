"""The router's edge: size limits (413, 400), a full router (429 with Retry-After), odd input that
used to be a 500 (lone surrogates, huge ints, `"stop": 7`) and never a request left in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from router_fakes import API_KEY, Cluster, start_cluster, wait_until

from pdserve.config.request_limits import RequestLimits
from pdserve.protocol import GenerateReq
from pdserve.router.errors import APIError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_MSG = [{"role": "user", "content": "hi"}]
SMALL = {"max_body_bytes": 64 * 1024, "max_in_flight": 3, "max_prompt_tokens": 50}


@pytest.fixture(scope="module")
def small() -> Iterator[Cluster]:
    """A router with a small body limit, a small in-flight limit and a prompt-token limit."""
    c = start_cluster(limits=SMALL)
    yield c
    c.stop()


def post(cluster: Cluster, path: str, body: object, **headers: str) -> httpx.Response:
    """POST `body` as JSON escaped to ASCII: a lone surrogate travels as legal JSON (\\ud800)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    return httpx.post(cluster.url + path, content=raw, headers=hdrs, timeout=60)


def error_of(resp: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "<any>":
        assert err["param"] == param, err
    return err


def assert_nothing_in_flight(cluster: Cluster) -> None:
    wait_until(lambda: len(cluster.router.tracker) == 0, 5.0)
    info = httpx.get(cluster.url + "/server_info", headers={"Authorization": f"Bearer {API_KEY}"})
    assert info.json()["num_requests_in_flight"] == 0


# ---------------------------------------------------------------------- body size


def test_the_default_limits_are_what_the_readme_documents(cluster: Cluster) -> None:
    assert cluster.router.spec.limits == RequestLimits()
    assert RequestLimits().max_body_bytes == 16 * 2**20


def test_a_100_mb_body_gets_413_quickly_under_the_default_limit(cluster: Cluster) -> None:
    body = b'{"prompt": "' + b"a" * 100_000_000 + b'"}'
    start = time.perf_counter()
    resp = post(cluster, COMPLETIONS, body)
    assert time.perf_counter() - start < 10.0
    err = error_of(resp, 413)
    assert err["code"] == "request_too_large" and str(16 * 2**20) in err["message"]
    assert_nothing_in_flight(cluster)


def test_a_body_over_the_configured_limit_gets_413(small: Cluster) -> None:
    body = {"prompt": "a" * (64 * 1024)}
    assert error_of(post(small, COMPLETIONS, body), 413)["code"] == "request_too_large"
    assert post(small, COMPLETIONS, {"prompt": "a" * 60_000}).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(small: Cluster) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it streams
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 8192
        yield b'"}'

    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    resp = httpx.post(small.url + COMPLETIONS, content=chunks(), headers=hdrs)
    assert error_of(resp, 413)["code"] == "request_too_large"


# ---------------------------------------------------------------------- request size


def test_a_5_mb_prompt_gets_400_quickly(cluster: Cluster) -> None:
    huge = "the keeper climbed the stairs. " * 170_000  # 5.3 MB, under the body limit
    for path, body, param in [
        (COMPLETIONS, {"prompt": huge}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": huge}]}, "messages"),
        ("/generate", {"text": huge}, "text"),
    ]:
        start = time.perf_counter()
        err = error_of(post(cluster, path, body), 400, param)
        assert time.perf_counter() - start < 3.0
        assert "characters: expected at most 1000000" in err["message"]
    assert not [r for r in cluster.requests() if len(r.text or "") > 10**6]  # none went on
    assert_nothing_in_flight(cluster)


def test_10000_prompts_get_400_quickly(cluster: Cluster) -> None:
    for path, body, param in [
        (COMPLETIONS, {"prompt": ["hello"] * 10_000}, "prompt"),
        (COMPLETIONS, {"prompt": [[1, 2, 3]] * 10_000}, "prompt"),
        ("/generate", {"text": ["hello"] * 10_000}, "text"),
    ]:
        start = time.perf_counter()
        err = error_of(post(cluster, path, body), 400, param)
        assert time.perf_counter() - start < 3.0
        assert "10000 prompts: expected at most 1024" in err["message"]
    assert_nothing_in_flight(cluster)


def test_a_grammar_at_the_limit_goes_on(cluster: Cluster) -> None:
    body = {"text": "a", "sampling_params": {"regex": "a" * 65_536, "max_new_tokens": 2}}
    assert post(cluster, "/generate", body).status_code == 200
    assert cluster.find_req(lambda r: len(r.sampling.get("regex") or "") == 65_536)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        (COMPLETIONS, {"prompt": ["a"] * 100, "n": 11}, "n", "1100 completions"),
        ("/generate", {"text": ["a"] * 9, "sampling_params": {"n": 128}}, "n", "1152"),
        (COMPLETIONS, {"prompt": "a", "stop": ["x" * 300] * 2000}, "stop", "2000 stop strings"),
        (COMPLETIONS, {"prompt": "a", "stop": ["x" * 257]}, "stop", "257 characters"),
        (
            CHAT,
            {"messages": USER_MSG, "stop_token_ids": list(range(300))},
            "stop_token_ids",
            "300 stop_token_ids",
        ),  # fmt: skip
        (
            CHAT,
            {"messages": USER_MSG, "logit_bias": {str(i): 1 for i in range(1025)}},
            "logit_bias",
            "1025 entries",
        ),  # fmt: skip
        ("/generate", {"text": "a", "sampling_params": {"stop": ["s"] * 33}}, "stop", "33 stop"),
        (
            CHAT,
            {
                "messages": USER_MSG,
                "tools": [
                    {"type": "function", "function": {"name": "f", "description": "d" * 1_000_000}}
                ],
                "tool_choice": "required",
            },
            "messages",
            "messages' content and tools has 100",
        ),  # fmt: skip
        (
            "/generate",
            {"text": "a", "sampling_params": {"regex": "a" * 65_537}},
            "regex",
            "regex has 65537 characters: expected at most 65536",
        ),  # fmt: skip
        (
            CHAT,
            {"messages": USER_MSG, "ebnf": 'root ::= "' + "a" * 70_000 + '"'},
            "ebnf",
            "ebnf has 70011 characters",
        ),  # fmt: skip
        (
            CHAT,
            {
                "messages": USER_MSG,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "big", "schema": {"enum": ["x" * 100] * 700}},
                },
            },
            "json_schema",
            "router.limits.max_grammar_chars",
        ),  # fmt: skip
    ],
)
def test_requests_over_a_size_limit_get_400_naming_it(
    cluster: Cluster, path: str, body: dict, param: str, message: str
) -> None:
    assert message in error_of(post(cluster, path, body), 400, param)["message"]
    assert_nothing_in_flight(cluster)


def test_max_prompt_tokens_refuses_a_long_token_prompt_at_the_router(small: Cluster) -> None:
    err = error_of(post(small, COMPLETIONS, {"prompt": list(range(51))}), 400, "prompt")
    assert "51 tokens: expected at most 50" in err["message"]
    assert post(small, COMPLETIONS, {"prompt": list(range(50))}).status_code == 200
    assert small.find_req(lambda r: r.input_ids == list(range(50))).max_prompt_tokens == 50


# ---------------------------------------------------------------------- a full router


def test_a_full_router_answers_429_with_retry_after(small: Cluster) -> None:
    async def scenario() -> None:
        hdrs = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=small.url, headers=hdrs, timeout=30) as client:
            hang = {"prompt": "HANG", "n": 3, "stream": True}  # 3 sub-requests: the router is full
            async with client.stream("POST", COMPLETIONS, json=hang) as stream:
                assert stream.status_code == 200
                resp = await client.post(COMPLETIONS, json={"prompt": "one more"})
                err = error_of(resp, 429)
                assert resp.headers["Retry-After"] == "1"
                assert err["code"] == "rate_limit_exceeded" and "busy" in err["message"]
            # The stream closed: its requests are aborted, the router has room again.
            wait_until(lambda: len(small.router.tracker) == 0, 5.0)
            assert (await client.post(COMPLETIONS, json={"prompt": "one more"})).status_code == 200

    asyncio.run(scenario())


def test_a_request_bigger_than_the_router_gets_400_not_429(small: Cluster) -> None:
    assert (
        "at most 3 at once"
        in error_of(post(small, CHAT, {"messages": USER_MSG, "n": 4}), 400)["message"]
    )


# ---------------------------------------------------------------------- odd input, no leaks


ODD = [
    (CHAT, {"messages": [{"role": "user", "content": "ok \ud800"}]}, "messages"),
    (CHAT, {"messages": USER_MSG, "stop": "ok \ud800"}, "stop"),
    (CHAT, {"messages": USER_MSG, "model": "ok \ud800"}, "model"),
    (CHAT, {"messages": USER_MSG, "seed": 2**64}, "seed"),
    (CHAT, {"messages": USER_MSG, "logit_bias": {"-1": 5}}, "logit_bias"),
    (CHAT, {"messages": USER_MSG, "logit_bias": {"\ud800": 5}}, "logit_bias"),
    (CHAT, {"messages": USER_MSG, "logit_bias": {"1": 1e300}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [1, 2**70]}, "prompt"),
    (COMPLETIONS, {"prompt": [[1], [-3]]}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [2**63]}, "stop_token_ids"),
    ("/generate", {"text": "x", "sampling_params": {"stop": 7}}, "stop"),
    ("/generate", {"text": "x", "sampling_params": {"seed": 2**64 - 1, "n": 2}}, "seed"),
    ("/generate", {"text": "x", "sampling_params": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2**70}}, "max_new_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"ignore_eos": "yes"}}, "ignore_eos"),
    ("/generate", {"text": "x", "sampling_params": [7]}, "sampling_params"),
    ("/generate", {"input_ids": [1, 2**70]}, "input_ids"),
    ("/generate", {"text": "x", "rid": "ok \ud800"}, "rid"),
    ("/generate", {"text": ["ok", "ok \udfff"]}, "text"),
]


@pytest.mark.parametrize(("path", "body", "param"), ODD)
def test_odd_input_is_a_400_naming_the_parameter_and_leaves_nothing_in_flight(
    cluster: Cluster, path: str, body: dict, param: str
) -> None:
    error_of(post(cluster, path, body), 400, param)
    assert_nothing_in_flight(cluster)


def test_a_request_the_codec_refuses_leaves_nothing_tracked(cluster: Cluster) -> None:
    router = cluster.router
    reqs = [
        GenerateReq(rid="fine", sampling={"max_new_tokens": 1}, text="HANG"),
        GenerateReq(rid="bad", sampling={"max_new_tokens": 1, "x": 2**70}, text="x"),
    ]

    async def submit() -> APIError:
        try:
            router.submit("g", reqs, [0, 1])
        except APIError as e:
            return e
        raise AssertionError("submit accepted an unencodable request")

    assert router._loop is not None
    err = asyncio.run_coroutine_threadsafe(submit(), router._loop).result(5)
    assert err.status == 400 and "could not be encoded" in err.message
    assert_nothing_in_flight(cluster)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(cluster: Cluster, scheme: str) -> None:
    resp = post(cluster, CHAT, {"messages": USER_MSG}, Authorization=f"{scheme} {API_KEY}")
    assert resp.status_code == 200


@pytest.mark.parametrize(
    "value", ["bearer wrong", f"Basic {API_KEY}", f"bearer{API_KEY}", API_KEY, "bearer"]
)
def test_a_wrong_key_or_scheme_is_still_401(cluster: Cluster, value: str) -> None:
    assert error_of(post(cluster, CHAT, {"messages": USER_MSG}, Authorization=value), 401)
