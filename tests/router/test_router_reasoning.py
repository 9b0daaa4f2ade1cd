"""A router with a reasoning parser: chat answers' <think> part comes back as
`reasoning_content`, whole and streamed (the fake tokenizer answers a prompt holding THINK with
"<think>\\nHmm, Paris</think>\\n\\nParis.", cut inside the closing tag); `separate_reasoning:
false` gets the text as written; a constrained request's grammar is asked to start after the
thinking (`grammar_after_reasoning`, what the worker compiles: tests/test_grammar_after_reasoning.py)
and its answer is split the same way; other routes are untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from router_fakes import API_KEY, MODEL, Cluster, start_cluster

from pdserve.config.sampling_params import SamplingParams

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def thinking() -> Iterator[Cluster]:
    c = start_cluster(reasoning_parser="qwen3")
    yield c
    c.stop()


def chat(cluster: Cluster, prompt: str = "THINK where?", **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(cluster.url + CHAT, json=body, headers=headers, timeout=30)


def streamed(resp: httpx.Response) -> tuple[str, str]:
    reasoning = content = ""
    for line in resp.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
    return reasoning, content


def test_the_thinking_comes_back_apart_whole_and_streamed(thinking: Cluster) -> None:
    message = chat(thinking).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Hmm, Paris" and message["content"] == "Paris."
    assert streamed(chat(thinking, stream=True)) == ("Hmm, Paris", "Paris.")
    plain = chat(thinking, "no thinking").json()["choices"][0]["message"]
    assert plain["reasoning_content"] is None and plain["content"] == "Hello world!"


def test_the_text_as_written_when_asked(thinking: Cluster) -> None:
    whole = "<think>\nHmm, Paris</think>\n\nParis."
    message = chat(thinking, separate_reasoning=False).json()["choices"][0]["message"]
    assert message["content"] == whole and "reasoning_content" not in message
    resp = chat(thinking, separate_reasoning="yes")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "separate_reasoning"


@pytest.mark.parametrize(
    "constraint",
    [{"response_format": {"type": "json_object"}},
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     {"regex": "Paris\\."},
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
      "tool_choice": "required"}],
)  # fmt: skip
def test_a_constraint_starts_after_the_thinking(thinking: Cluster, constraint: dict) -> None:
    prompt = f"THINK {len(thinking.requests())}"  # names this request among those recorded
    message = chat(thinking, prompt, **constraint).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Hmm, Paris" and message["content"] == "Paris."
    sent = thinking.find_req(lambda r: prompt in str(r.messages))
    grammar = SamplingParams.from_dict(sent.sampling).grammar
    assert grammar is not None and grammar.after_reasoning == "qwen3"
    stream = chat(thinking, prompt, stream=True, **constraint)
    assert streamed(stream) == ("Hmm, Paris", "Paris.")


def test_free_text_asks_for_no_grammar(thinking: Cluster, cluster: Cluster) -> None:
    prompt = f"THINK {len(thinking.requests())}"
    chat(thinking, prompt)
    sent = thinking.find_req(lambda r: prompt in str(r.messages)).sampling
    assert SamplingParams.from_dict(sent).grammar is None
    fmt = {"type": "json_object"}
    assert chat(cluster, "THINK plain", response_format=fmt).status_code == 200
    sent = cluster.find_req(lambda r: "THINK plain" in str(r.messages)).sampling
    grammar = SamplingParams.from_dict(sent).grammar  # no reasoning parser: the whole output
    assert grammar is not None and grammar.after_reasoning is None


def test_without_a_parser_nothing_is_split(cluster: Cluster) -> None:
    message = chat(cluster).json()["choices"][0]["message"]
    assert message["content"].startswith("<think>") and "reasoning_content" not in message


@pytest.fixture(scope="module")
def opened_in_prompt() -> Iterator[Cluster]:
    c = start_cluster(reasoning_parser="deepseek_r1")
    yield c
    c.stop()


@pytest.mark.parametrize("switch", ["enable_thinking", "thinking"])
def test_thinking_switched_off_is_all_content(opened_in_prompt: Cluster, switch: str) -> None:
    # deepseek_r1 reads an answer that never closes the thinking as all reasoning; a request
    # whose template kwargs switch the thinking off (Qwen3, GLM-4.5: enable_thinking;
    # DeepSeek-V3.1: thinking) gets its answer as content, and a grammar over all of it.
    c = opened_in_prompt
    assert chat(c, "plain").json()["choices"][0]["message"]["reasoning_content"] == "Hello world!"
    off = {"chat_template_kwargs": {switch: False}}
    message = chat(c, "plain", **off).json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] == "Hello world!"
    assert streamed(chat(c, "plain", stream=True, **off)) == ("", "Hello world!")
    prompt = f"plain {switch} {len(c.requests())}"
    assert chat(c, prompt, response_format={"type": "json_object"}, **off).status_code == 200
    sent = c.find_req(lambda r: prompt in str(r.messages)).sampling
    grammar = SamplingParams.from_dict(sent).grammar
    assert grammar is not None and grammar.after_reasoning is None
    on = {"chat_template_kwargs": {switch: True}}
    prompt = f"plain on {switch} {len(c.requests())}"
    assert chat(c, prompt, response_format={"type": "json_object"}, **on).status_code == 200
    sent = c.find_req(lambda r: prompt in str(r.messages)).sampling
    assert SamplingParams.from_dict(sent).grammar.after_reasoning == "deepseek_r1"  # type: ignore[union-attr]
