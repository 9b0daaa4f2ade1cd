"""Tool calling end to end on the tiny model (random weights), through the openai client on the
mixed and prefill + decode clusters: `tool_choice` "required" and a named function hold the
output to the tools' schemas, so every call names a declared tool and its arguments validate
(checked with jsonschema), whole and streamed; a conversation carrying the calls and the tools'
answers is rendered and served. (`auto` reads the model's own format: tests/router/
test_tool_calls.py; the tiny model's template writes none, so it is refused here.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

MODEL = "llama"
MAX_TOKENS = 480  # random weights pad JSON with whitespace
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(params=["mixed_cluster", "pd_cluster"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(request.param)


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(c: openai.OpenAI, **kw: Any) -> tuple[str, list[Any], str | None]:
    """(content, tool calls, finish_reason) of a streamed chat completion."""
    content, calls, reason = "", [], None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            reason = choice.finish_reason or reason
    return content, calls, reason


def test_required_and_named_calls_validate(cluster: Cluster) -> None:
    c = client(cluster)
    common: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
                              "max_tokens": MAX_TOKENS, "temperature": 1.0}  # fmt: skip
    for seed in (1, 2):
        res = c.chat.completions.create(
            tool_choice="required", parallel_tool_calls=False, seed=seed, **common
        )
        choice = res.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls or []) == 1
        check_calls(choice.message.tool_calls or [], set(SCHEMAS))
    named = {"type": "function", "function": {"name": "get_weather"}}
    res = c.chat.completions.create(tool_choice=named, n=2, seed=3, **common)
    for choice in res.choices:
        assert choice.finish_reason == "stop"  # asked for, not chosen (OpenAI's, vLLM's)
        check_calls(choice.message.tool_calls or [], {"get_weather"})
    content, calls, reason = streamed(c, tool_choice=named, seed=4, **common)
    assert content == "" and reason == "stop" and len(calls) == 1
    assert calls[0].index == 0
    check_calls(calls, {"get_weather"})
    content, calls, reason = streamed(
        c, tool_choice="required", parallel_tool_calls=False, seed=5, **common
    )
    assert content == "" and reason == "tool_calls"
    check_calls(calls, set(SCHEMAS))


def test_a_conversation_with_calls_and_their_results_is_served(cluster: Cluster) -> None:
    c = client(cluster)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}  # fmt: skip
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    res = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                    tool_choice="none", max_tokens=4)  # fmt: skip
    assert res.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:  # the template writes no call format
        c.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=4)
    assert "tool_choice" in str(info.value)
