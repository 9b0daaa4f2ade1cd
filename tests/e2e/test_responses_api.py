"""OpenAI's Responses API (`/v1/responses`) through the official client on the prefill + decode
cluster: text and message input with instructions give the chat route's greedy text, a JSON
schema in `text.format` holds the output, function tools with `tool_choice: required` give
`function_call` items whose arguments validate (whole and streamed) and a conversation carrying
them and their outputs is served, the streamed events add up to the whole response, and the
fields it does not serve are 400s naming them."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

MODEL = "llama"
SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
          "additionalProperties": False}  # fmt: skip


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_text(c: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int) -> str:
    res = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
                                    temperature=0)  # fmt: skip
    return res.choices[0].message.content or ""


def test_text_and_messages_give_the_chat_routes_text(pd_cluster: Cluster) -> None:
    c = client(pd_cluster)
    res = c.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=8,
                             temperature=0)  # fmt: skip
    assert res.object == "response" and res.id.startswith("resp_")
    assert res.output_text == chat_text(c, [{"role": "user", "content": "Tell me a story"}], 8)
    assert res.usage is not None and res.usage.output_tokens == 8
    assert res.status == "incomplete" and res.incomplete_details is not None  # the limit ended it
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "And again?"}]  # fmt: skip
    res = c.responses.create(model=MODEL, input=messages, instructions="Be brief.",  # type: ignore[arg-type]
                             max_output_tokens=6, temperature=0)  # fmt: skip
    want = chat_text(c, [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "And again?"}], 6)  # fmt: skip
    assert res.output_text == want


def test_a_json_schema_format_holds_the_output(pd_cluster: Cluster) -> None:
    res = client(pd_cluster).responses.create(
        model=MODEL, input="Answer in JSON", max_output_tokens=200, temperature=1.0,
        text={"format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}},
    )  # fmt: skip
    assert res.status == "completed", res
    jsonschema.validate(json.loads(res.output_text), SCHEMA)


def test_streamed_events_add_up_to_the_response(pd_cluster: Cluster) -> None:
    c = client(pd_cluster)
    events = list(c.responses.create(model=MODEL, input="Stream it", max_output_tokens=10,
                                     temperature=0, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == deltas == events[-4].text
    assert deltas == chat_text(c, [{"role": "user", "content": "Stream it"}], 10)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"colour": "red"}, "colour"),
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text"),
    ],
)
def test_what_it_does_not_serve_is_a_400_naming_it(
    pd_cluster: Cluster, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(pd_cluster).responses.create(model=MODEL, input="hi", extra_body=extra)
    assert info.value.body["param"] == param  # type: ignore[index]


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
           "required": ["city"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]


def test_function_tools_give_function_call_items(pd_cluster: Cluster) -> None:
    c = client(pd_cluster)
    common: dict[str, Any] = {"model": MODEL, "tools": TOOLS, "tool_choice": "required",
                              "parallel_tool_calls": False, "max_output_tokens": 480,
                              "temperature": 0}  # fmt: skip
    res = c.responses.create(input="Weather in Paris?", **common)
    calls = [item for item in res.output if item.type == "function_call"]
    assert calls and res.status == "completed", res
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    # Streamed: each call as its own output item events, the same as the final response's.
    events = list(c.responses.create(input="Weather in Paris?", stream=True, **common))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    streamed = [item for item in done if item.type == "function_call"]
    final = events[-1].response
    assert [(x.call_id, x.arguments) for x in streamed] == [
        (x.call_id, x.arguments) for x in final.output if x.type == "function_call"
    ]
    if final.status == "completed":  # (greedy as above, but the prompt is cached now)
        assert streamed
        for call in streamed:
            jsonschema.validate(json.loads(call.arguments), WEATHER)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "sunny, 21 C"}]  # fmt: skip
    answer = c.responses.create(model=MODEL, input=history, max_output_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert answer.output[0].type == "message" and answer.usage is not None
