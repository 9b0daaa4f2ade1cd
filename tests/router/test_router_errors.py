"""Bad requests get HTTP 400 with OpenAI's error body and the server keeps serving; auth is 401."""

from __future__ import annotations

import httpx
import openai
import pytest
from router_fakes import API_KEY, MODEL, Cluster

from pdserve.router.errors import tokenizer_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_MSG = [{"role": "user", "content": "hi"}]

BAD_BODIES = [
    pytest.param(
        CHAT, {"messages": USER_MSG, "temperature": "hot"}, "temperature", id="wrong-type"
    ),
    pytest.param(CHAT, {"messages": "hi"}, "messages", id="messages-not-a-list"),
    pytest.param(CHAT, {"messages": []}, "messages", id="empty-messages"),
    pytest.param(CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, None, id="bad-role"),
    pytest.param(CHAT, {"messages": USER_MSG, "temperature": -1}, "temperature", id="temp<0"),
    pytest.param(CHAT, {"messages": USER_MSG, "top_p": 0}, "top_p", id="top_p=0"),
    pytest.param(CHAT, {"messages": USER_MSG, "n": 0}, "n", id="n=0"),
    pytest.param(CHAT, {"messages": USER_MSG, "n": 129}, "n", id="n=129"),
    pytest.param(CHAT, {"messages": USER_MSG, "max_tokens": -5}, "max_tokens", id="max_tokens<0"),
    pytest.param(
        CHAT, {"messages": USER_MSG, "presence_penalty": 3}, "presence_penalty", id="penalty"
    ),
    pytest.param(
        CHAT,
        {"messages": USER_MSG, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
        id="top_logprobs>20",
    ),  # fmt: skip
    pytest.param(CHAT, {"messages": USER_MSG, "top_logprobs": 3}, "top_logprobs", id="no-logprobs"),
    pytest.param(
        CHAT,
        {"messages": USER_MSG, "min_tokens": 50, "max_tokens": 10},
        "min_tokens",
        id="min>max",
    ),  # fmt: skip
    pytest.param(
        CHAT,
        {"messages": USER_MSG, "continue_final_message": True},
        "continue_final_message",
        id="continue-without-assistant",
    ),  # fmt: skip
    pytest.param(COMPLETIONS, {"prompt": "x", "logprobs": 6}, "logprobs", id="logprobs>5"),
    pytest.param(COMPLETIONS, {"prompt": []}, "prompt", id="empty-prompt"),
    pytest.param(COMPLETIONS, {"prompt": ["a", 1]}, "prompt", id="mixed-prompt"),
    pytest.param(COMPLETIONS, {}, "prompt", id="missing-prompt"),
    pytest.param(COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop", id="empty-stop"),
    pytest.param(
        "/generate",
        {"text": "x", "sampling_params": {"temperature": -2}},
        "temperature",
        id="generate-bad-sampling",
    ),  # fmt: skip
    pytest.param(
        "/generate",
        {"text": "x", "sampling_params": {"colour": 1}},
        None,
        id="generate-unknown-sampling",
    ),  # fmt: skip
    pytest.param("/generate", {"sampling_params": {}}, "text", id="generate-no-input"),
]


def _assert_openai_error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "BadRequestError")
    return err


@pytest.mark.parametrize(("path", "body", "param"), BAD_BODIES)
def test_bad_request_gets_400_with_openai_error_body(
    cluster: Cluster, auth: dict[str, str], path: str, body: dict, param: str | None
) -> None:
    body = {"model": MODEL, **body} if path != "/generate" else body
    err = _assert_openai_error(httpx.post(cluster.url + path, json=body, headers=auth))
    if param is not None:
        assert err["param"] == param, err
    # and the server keeps serving
    ok = httpx.post(cluster.url + CHAT, json={"messages": USER_MSG}, headers=auth)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_malformed_json_gets_400(cluster: Cluster, auth: dict[str, str]) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    resp = httpx.post(cluster.url + CHAT, content=b'{"messages": [', headers=headers)
    assert "JSON" in _assert_openai_error(resp)["message"]


def test_unknown_model_gets_model_not_found(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-17", messages=USER_MSG)
    assert info.value.status_code == 400
    assert info.value.code == "model_not_found"
    assert "gpt-17" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_tokenizer_error_becomes_400_even_when_streaming(
    cluster: Cluster, auth: dict[str, str], stream: bool
) -> None:
    body = {"messages": [{"role": "user", "content": "TOO_LONG"}], "stream": stream}
    resp = httpx.post(cluster.url + CHAT, json=body, headers=auth)
    err = _assert_openai_error(resp)
    assert "max_context_len=4096" in err["message"]
    assert resp.headers["content-type"].startswith("application/json")


def test_tokenizer_error_for_one_prompt_of_a_batch_fails_the_request(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    body = {"prompt": ["fine", "TOO_LONG"], "stream": True}
    _assert_openai_error(httpx.post(cluster.url + COMPLETIONS, json=body, headers=auth))


def test_missing_or_wrong_key_gets_401(cluster: Cluster) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.post(cluster.url + CHAT, json={"messages": USER_MSG}, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(cluster.url + "/metrics", headers=headers).status_code == 401
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_needs_no_key(cluster: Cluster) -> None:
    resp = httpx.get(cluster.url + "/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_unknown_route_gets_404_error_body(cluster: Cluster, auth: dict[str, str]) -> None:
    resp = httpx.get(cluster.url + "/v1/nothing", headers=auth)
    assert resp.status_code == 404 and "error" in resp.json()


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("prompt has no tokens: the prompt is empty, expected at least one", "prompt"),
        ("messages has no tokens: the prompt is empty, expected at least one", "messages"),
        ("input_ids[1]=99999 is not a token id: expected an integer in [0, 512)", "input_ids"),
        ("max_new_tokens=0 is invalid: expected an integer >= 1", "max_tokens"),
        ("This model's maximum context length is 256 tokens.", None),
    ],
)
def test_a_tokenizer_refusal_names_the_parameter_its_message_starts_with(
    message: str, param: str | None
) -> None:
    err = tokenizer_error(message)
    assert (err.status, err.param) == (400, param)
