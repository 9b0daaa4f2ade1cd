"""OpenAI endpoints through the real `openai` client and raw httpx, against fake peers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from router_fakes import ALT_TEXT, API_KEY, CACHED_TOKENS, MODEL, PROMPT_TOKENS, Cluster

import pdserve
from pdserve.protocol import GenerateReq


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)


def _sse_events(response: httpx.Response) -> list[str]:
    body = response.read().decode()
    assert body.endswith("data: [DONE]\n\n")
    return [block[len("data: ") :] for block in body.split("\n\n") if block]


def test_chat_completion_returns_text_usage_and_finish(client: openai.OpenAI, cluster: Cluster):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0.0,
    )
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert resp.id.startswith("chatcmpl-")
    assert len(resp.choices) == 1
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Hello world!"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens == PROMPT_TOKENS
    assert resp.usage.completion_tokens == 3
    assert resp.usage.total_tokens == PROMPT_TOKENS + 3
    assert resp.usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS
    req = cluster.find_req(lambda r: r.rid == resp.id.removeprefix("chatcmpl-"))
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert req.sampling["max_new_tokens"] == 10 and req.sampling["temperature"] == 0.0
    assert req.add_generation_prompt and not req.continue_final_message
    assert req.max_context_len == 4096


def test_chat_stream_yields_role_then_deltas_then_finish(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        model=MODEL,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_continuous_usage_stats_put_the_counts_so_far_on_every_chunk(
    client: openai.OpenAI, route: str
) -> None:
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk after the
    first output carries the usage so far, growing to the final count; without include_usage,
    nothing."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"model": MODEL, "stream": True, "stream_options": options, "n": 2}
    if route == "chat":
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                                     **common))  # fmt: skip
    else:
        chunks = list(client.completions.create(prompt="hi", **common))
    content = [c for c in chunks if c.choices and c.usage is not None]
    assert content and all(c.usage.prompt_tokens == PROMPT_TOKENS for c in content)
    assert all(c.usage is not None for c in chunks)  # the role chunks too (vLLM's shape)
    counts = [c.usage.completion_tokens for c in content]
    assert counts == sorted(counts) and counts[-1] == 6  # two choices of 3 tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    quiet = {**common, "stream_options": {"continuous_usage_stats": True}}
    plain = list(client.completions.create(prompt="hi", **quiet))
    assert all(c.usage is None for c in plain)


def test_chat_n2_gives_two_choices_with_distinct_seeds(
    client: openai.OpenAI, cluster: Cluster
) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "two please"}], n=2, seed=11
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content == "Hello world!" for c in resp.choices)
    assert resp.usage.prompt_tokens == PROMPT_TOKENS  # the prompt counted once
    assert resp.usage.completion_tokens == 6
    group = resp.id.removeprefix("chatcmpl-")
    subs = sorted((r for r in cluster.requests() if r.rid.startswith(group)), key=lambda r: r.rid)
    assert [r.sampling["seed"] for r in subs] == [11, 12]
    assert all(r.sampling["n"] == 1 for r in subs)
    assert subs[0].decode_idx == subs[1].decode_idx  # copies of one prompt share a route


def test_chat_stream_n2_merges_choices_by_index(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, stream=True
    )
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello world!", 1: "Hello world!"}
    assert finishes == {0: "stop", 1: "stop"}


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", " world", "!"]
    assert [t.logprob for t in content] == [-0.5, -1.5, -2.5]
    assert content[0].bytes == list(b"Hello")
    assert [a.token for a in content[0].top_logprobs] == ["Hello", ALT_TEXT]
    assert content[0].top_logprobs[1].bytes == list(ALT_TEXT.encode())
    assert content[0].top_logprobs[1].logprob == -2.0


def test_continue_final_message_reaches_the_tokenizer(
    client: openai.OpenAI, cluster: Cluster
) -> None:
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two,"},
    ]
    resp = client.chat.completions.create(
        model=MODEL, messages=messages, extra_body={"continue_final_message": True}
    )
    req = cluster.find_req(lambda r: r.rid == resp.id.removeprefix("chatcmpl-"))
    assert req.continue_final_message is True and req.add_generation_prompt is False
    assert req.messages[-1] == {"role": "assistant", "content": "One, two,"}


def test_completion_with_list_of_prompts_gives_a_choice_per_prompt_and_n(
    client: openai.OpenAI,
) -> None:
    resp = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=2)
    assert resp.object == "text_completion"
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello world" and c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.prompt_tokens == 2 * PROMPT_TOKENS
    assert resp.usage.completion_tokens == 8


def test_completion_token_prompt_and_echo(client: openai.OpenAI, cluster: Cluster) -> None:
    resp = client.completions.create(model=MODEL, prompt=[5, 6, 7], echo=True)
    assert resp.choices[0].text == "5 6 7" + "Hello world!"
    req = cluster.find_req(lambda r: r.rid == resp.id.removeprefix("cmpl-"))
    assert req.input_ids == [5, 6, 7] and req.text is None and req.echo
    assert req.sampling["max_new_tokens"] == 16  # OpenAI's completions default


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="x", logprobs=1)
    lp = resp.choices[0].logprobs
    assert lp.tokens == ["Hello", " world", "!"]
    assert lp.token_logprobs == [-0.5, -1.5, -2.5]
    assert lp.text_offset == [0, 5, 11]
    assert lp.top_logprobs[0] == {"Hello": -0.5}


def test_completion_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="hi", stream=True, echo=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "hiHello world!"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_sse_format_and_headers(cluster: Cluster, auth: dict[str, str]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", cluster.url + "/v1/chat/completions", json=body, headers=auth
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in parsed[0]  # only with stream_options.include_usage
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_list_names_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("other")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_version_and_model_routes_need_the_key(cluster: Cluster) -> None:
    for path in ("/version", f"/v1/models/{MODEL}"):
        assert httpx.get(cluster.url + path, timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    version = httpx.get(cluster.url + "/version", headers=headers, timeout=10).json()
    assert version == {"version": pdserve.__version__}


def test_round_robin_spreads_requests_over_tokenizers_and_workers(
    client: openai.OpenAI, cluster: Cluster
) -> None:
    for _ in range(4):
        client.completions.create(model=MODEL, prompt="spread")
    reqs = [r for r in cluster.requests() if r.text == "spread"]
    assert len(reqs) == 4
    assert sorted(r.decode_idx for r in reqs) == [0, 0, 1, 1]
    assert sorted(r.prefill_idx for r in reqs) == [0, 0, 1, 1]
    spread_rids = {r.rid for r in reqs}
    per_tokenizer = [
        sum(r.rid in spread_rids for r in t.of_type(GenerateReq)) for t in cluster.tokenizers
    ]
    assert per_tokenizer == [2, 2]
