"""Tool calling's pieces: the checks of `tools` and `tool_choice` (400s naming them), the schema
`required` and a named function hold the output to (checked with jsonschema), the three parsers
of `auto`, and the streamed choice that holds a call back until it can be read whole (the same
content and calls as the whole text, however the text is cut into deltas)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.errors import APIError
from pdserve.router.openai_models import ChatMessage
from pdserve.router.tool_calls import (
    ToolCallStream,
    ToolPlan,
    chat_template_of,
    detect_parser,
    parse_tool_calls,
    plan_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
NAMES = ("get_weather", "get_time")
HERMES_TEMPLATE = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>"


def plan(choice: Any = "auto", parser: str = "hermes", parallel: bool | None = None) -> ToolPlan:
    templates = {"hermes": HERMES_TEMPLATE, "mistral": "[TOOL_CALLS]",
                 "llama3_json": "<|python_tag|>"}  # fmt: skip
    result = plan_tools(TOOLS, choice, templates[parser], parallel)
    assert result is not None
    return result


def calls_as_pairs(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize(
    ("tools", "choice", "param", "message"),
    [
        ({"a": 1}, "auto", "tools", "tools must be a list"),
        ([{"type": "retrieval"}], "auto", "tools", "tools[0]: expected"),
        ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools", "a b"),
        ([{"type": "function", "function": {"name": "f", "parameters": 3}}], "auto", "tools",
         "parameters: expected a JSON schema object"),
        ([TIME, TIME], "auto", "tools", "declared twice"),
        (TOOLS, "sometimes", "tool_choice", "expected 'none', 'auto', 'required'"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice",
         "'nope', which is not in tools"),
        (None, "required", "tool_choice", "tool_choice needs tools"),
    ],
)  # fmt: skip
def test_bad_tools_and_choices_are_400s_naming_them(
    tools: Any, choice: Any, param: str, message: str
) -> None:
    with pytest.raises(APIError) as info:
        plan_tools(tools, choice, HERMES_TEMPLATE)
    assert info.value.status == 400 and info.value.param == param
    assert message in info.value.message


def test_auto_needs_a_template_that_writes_calls_and_none_asks_for_nothing() -> None:
    with pytest.raises(APIError) as info:
        plan_tools(TOOLS, "auto", "{{ messages }}")
    assert info.value.param == "tool_choice" and "'required'" in info.value.message
    assert plan_tools(TOOLS, "none", None) is None
    assert plan_tools(None, None, None) is None and plan_tools([], "auto", None) is None
    assert plan_tools(TOOLS, "required", None) is not None  # needs no parser
    assert detect_parser(HERMES_TEMPLATE) == "hermes"
    assert detect_parser("x [TOOL_CALLS] y") == "mistral"
    assert detect_parser("<|python_tag|>") == "llama3_json"


def test_required_and_named_schemas_admit_exactly_the_declared_calls() -> None:
    required = plan("required").json_schema()
    good = [{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}},
            {"name": "get_time", "parameters": {}}]  # fmt: skip
    jsonschema.validate(good, required)
    for bad in ([], [{"name": "get_weather", "parameters": {"days": 2}}],
                [{"name": "other", "parameters": {}}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    single = plan("required", parallel=False).json_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named.json_schema() == WEATHER["function"]["parameters"]
    content, calls = named.calls_of('{"city": "Paris"}')
    assert content is None and calls_as_pairs(calls) == [("get_weather", {"city": "Paris"})]
    content, calls = plan("required").calls_of(json.dumps(good))
    assert content is None
    assert calls_as_pairs(calls) == [(g["name"], g["parameters"]) for g in good]
    assert plan("required").calls_of('[{"name": "get_time"')[1] == []  # cut short: text
    assert plan("required").calls_of("5") == ("5", [])  # not a list: text


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Paris"}}\n</tool_call>', "Let me look.", [("get_weather", {"city": "Paris"})]),
        ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>'
         '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', None,
         [("get_time", {}), ("get_weather", {"city": "Oslo"})]),
        ("hermes", "No tools needed.", "No tools needed.", []),
        ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, []),
        ("hermes", "<tool_call>{broken</tool_call>", None, []),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
         None, [("get_weather", {"city": "Rome"})]),
        ("llama3_json", '{"name": "get_time", "parameters": {}}; {"name": "get_time", '
         '"parameters": {}}', None, [("get_time", {}), ("get_time", {})]),
        ("llama3_json", "The answer is {1}.", "The answer is {1}.", []),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lima"}}]',
         None, [("get_weather", {"city": "Lima"})]),
    ],
)  # fmt: skip
def test_auto_parsers_read_calls_of_declared_tools_only(
    parser: str, text: str, content: str | None, calls: list
) -> None:
    got_content, got_calls = parse_tool_calls(text, parser, NAMES)
    assert calls_as_pairs(got_calls) == calls
    if calls:
        assert got_content == content
    else:
        assert got_content == text  # not calls: all of it is content


def test_parallel_false_keeps_the_first_call_of_auto() -> None:
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 2
    assert len(plan(parallel=False).calls_of(text)[1]) == 1
    assert len(plan().calls_of(text)[1]) == 2


STREAM_TEXTS = [
    ("hermes", 'Checking <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
    ("hermes", "a < b and <tool is not <tool_call the end"),
    ("hermes", "<tool_cal"),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}'),
    ("llama3_json", '  {"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    ("llama3_json", "<|python_tag plain text"),
    ("llama3_json", "Hello {not a call}"),
    ("mistral", 'ok [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]'),
    ("mistral", "[TOOL_CALLS] [broken"),
]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(case=st.sampled_from(STREAM_TEXTS), seed=st.integers(0, 2**16))
def test_a_streamed_choice_sends_what_the_whole_text_gives(case: tuple[str, str], seed: int):
    parser, text = case
    cuts = sorted(random.Random(seed).sample(range(1, len(text)), min(4, len(text) - 1)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream = ToolCallStream(plan(parser=parser))
    sent = "".join(stream.feed(d) for d in deltas)
    rest, calls = stream.finish()
    whole_content, whole_calls = plan(parser=parser).calls_of(text)
    assert calls_as_pairs(calls) == calls_as_pairs(whole_calls)
    if whole_calls:  # the text before the call, as it was written
        assert (sent + rest).strip() == (whole_content or "")
    else:
        assert sent + rest == text


def test_a_constrained_stream_sends_no_content() -> None:
    stream = ToolCallStream(plan("required"))
    assert stream.feed('[{"name": "get_time", ') == "" and stream.feed('"parameters": {}}]') == ""
    rest, calls = stream.finish()
    assert rest == "" and calls_as_pairs(calls) == [("get_time", {})]


def test_an_assistant_messages_calls_reach_the_template_with_object_arguments() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}},
        {"id": "c2", "function": {"name": "g", "arguments": "not json"}},
    ]
    message = ChatMessage(role="assistant", content=None, tool_calls=calls)
    rendered = message.to_template_dict()["tool_calls"]
    assert rendered[0]["function"] == {"name": "f", "arguments": {"a": [1]}}
    assert rendered[1]["function"]["arguments"] == "not json" and rendered[1]["type"] == "function"
    assert calls[0]["function"]["arguments"] == '{"a": [1]}'  # the request itself unchanged
    with pytest.raises(ValueError):
        ChatMessage(role="assistant", tool_calls=[{"id": "c", "type": "function"}])


def test_the_chat_template_is_read_from_the_model_directory(tmp_path: Path) -> None:
    assert chat_template_of(str(tmp_path / "none")) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "a <tool_call>"}))
    assert chat_template_of(str(tmp_path)) == "a <tool_call>"
    named = tmp_path / "named"
    named.mkdir()
    templates = [
        {"name": "default", "template": "x"},
        {"name": "tool_use", "template": "[TOOL_CALLS]"},
    ]
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert detect_parser(chat_template_of(str(named))) == "mistral"
    jinja = tmp_path / "jinja"
    jinja.mkdir()
    (jinja / "chat_template.jinja").write_text("{{ '<|python_tag|>' }}")
    (jinja / "tokenizer_config.json").write_text("{not json")
    assert detect_parser(chat_template_of(str(jinja))) == "llama3_json"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    assert chat_template_of(str(broken)) is None
