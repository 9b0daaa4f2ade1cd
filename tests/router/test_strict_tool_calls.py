"""`strict: true` functions under tool_choice "auto": the structural tag the router asks for
(ToolPlan.structural_tag), compiled on the tiny model's real tokenizer as a worker compiles it.
The text stays free; a call opened in the parser's format (hermes, llama3_json) must name a
declared tool, with arguments matching a strict tool's schema (any object for the others). The
reference, on random texts (hypothesis): jsonschema for each call's arguments, and the auto
parser reads back exactly the calls written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_grammars import bound_grammar, completes
from router_fakes import API_KEY, MODEL, Cluster, start_cluster

from pdserve.config.sampling_params import SamplingParams
from pdserve.router.errors import APIError
from pdserve.router.tool_calls import ToolPlan, parse_tool_calls, plan_tools
from pdserve.worker.grammar import RequestGrammar

WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "parameters": WEATHER_ARGS, "strict": True}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}  # fmt: skip
TOOLS = [WEATHER, TIME]
TEMPLATES = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
ARGUMENTS = [{"city": "Paris"}, {"city": "Oslo", "days": 2}, {"city": "Rome"}, {"zone": "UTC"},
             {"city": "Paris", "x": 1}, {}, {"days": 1}]  # fmt: skip
FREE = ["Let me look. ", "ok", "\n", "<tool", "call>", " {x}", "name"]


def plan(parser: str = "hermes", parallel: bool | None = None, tools: Any = TOOLS) -> ToolPlan:
    result = plan_tools(tools, "auto", TEMPLATES[parser], parallel)
    assert result is not None
    return result


def grammar(model: Path, p: ToolPlan) -> RequestGrammar:
    tag = p.structural_tag()
    assert tag is not None
    return bound_grammar(model, SamplingParams(structural_tag=tag))  # type: ignore[arg-type]


def call_text(parser: str, name: str, arguments: dict[str, Any]) -> str:
    if parser == "hermes":
        return (
            f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'
        )
    return f'{{"name": "{name}", "parameters": {json.dumps(arguments)}}}'


def test_only_strict_auto_plans_ask_for_a_tag() -> None:
    assert plan().structural_tag() is not None
    loose = [TIME, {"type": "function", "function": {"name": "f", "strict": False}}]
    assert plan(tools=loose).structural_tag() is None
    required = plan_tools(TOOLS, "required", TEMPLATES["hermes"])
    assert required is not None and required.structural_tag() is None  # its schema holds it


@pytest.mark.parametrize(
    ("tools", "parser", "message"),
    [
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "hermes",
         "tools[0].function.strict: expected true or false"),
        (TOOLS, "mistral", "strict functions with tool_choice 'auto' are not supported"),
    ],
)  # fmt: skip
def test_a_bad_strict_or_an_unsupported_format_is_a_400(
    tools: Any, parser: str, message: str
) -> None:
    with pytest.raises(APIError) as info:
        plan_tools(tools, "auto", TEMPLATES[parser])
    assert info.value.status == 400 and info.value.param == "tools"
    assert message in info.value.message


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_calls_are_held_to_the_strict_schema(tiny_llama: Path, parser: str) -> None:
    good = call_text(parser, "get_weather", {"city": "Paris", "days": 3})
    cases = {
        "No tool needed.": True,
        good: True,
        call_text(parser, "get_time", {"zone": "UTC", "extra": [1]}): True,  # not strict
        call_text(parser, "get_weather", {"city": "Rome"}): False,
        call_text(parser, "get_weather", {"city": "Paris", "x": 1}): False,
        call_text(parser, "get_time", [1]): False,  # arguments are an object
        call_text(parser, "get_lunch", {"city": "Paris"}): False,
    }
    for text, ok in cases.items():
        assert completes(grammar(tiny_llama, plan(parser)), text) is ok, text
    both = good + "\n" + call_text(parser, "get_time", {"zone": "CET"})
    assert completes(grammar(tiny_llama, plan(parser)), both)
    assert not completes(grammar(tiny_llama, plan(parser, parallel=False)), both)
    assert completes(grammar(tiny_llama, plan(parser, parallel=False)), good)


call = st.tuples(st.sampled_from(["get_weather", "get_time"]), st.sampled_from(ARGUMENTS))


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    free=st.lists(st.sampled_from(FREE), max_size=4).map("".join), calls=st.lists(call, max_size=3)
)
def test_random_hermes_outputs_against_jsonschema_and_the_parser(
    tiny_llama: Path, free: str, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    text = free + "\n".join(call_text("hermes", name, args) for name, args in calls)

    def valid(name: str, arguments: dict[str, Any]) -> bool:
        if name != "get_weather":
            return True  # get_time is not strict: any object
        try:
            jsonschema.validate(arguments, WEATHER_ARGS)
        except jsonschema.ValidationError:
            return False
        return True

    expected = all(valid(name, args) for name, args in calls)
    assert completes(grammar(tiny_llama, plan()), text) is expected, text
    if expected and calls:
        _, parsed = parse_tool_calls(text, "hermes", ("get_weather", "get_time"))
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]
        assert got == calls


@pytest.fixture(scope="module")
def hermes_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The router's fakes with a tokenizer directory whose chat template writes hermes calls."""
    model_dir = tmp_path_factory.mktemp("hermes-template")
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}<tool_call>"
    )
    c = start_cluster(tokenizer_path=str(model_dir))
    yield c
    c.stop()


def test_the_router_asks_for_the_tag_and_refuses_two_constraints(hermes_router: Cluster) -> None:
    marker = f"strict {len(hermes_router.requests())}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "tools": TOOLS}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = hermes_router.url + "/v1/chat/completions"
    resp = httpx.post(url, json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "Hello world!"  # the fake's text
    sent = hermes_router.find_req(lambda r: marker in str(r.messages)).sampling
    spec = SamplingParams.from_dict(sent).grammar
    assert spec is not None and spec.kind == "structural_tag"
    assert json.loads(spec.text) == plan().structural_tag()
    both = {**body, "response_format": {"type": "json_object"}}
    resp = httpx.post(url, json=both, headers=headers, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"
