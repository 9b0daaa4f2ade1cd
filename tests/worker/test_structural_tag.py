"""Structural tags (`structural_tag` in sampling_params; response_format of that type): SGLang's
shape (`structures` + `triggers`: free text until a trigger, then the tag with JSON matching its
schema, then free text again) and xgrammar's (`format`), checked and compiled on the tiny model's
real tokenizer. The reference for SGLang's shape: the text cut at each trigger, each tag's JSON
validated by jsonschema, on random texts (hypothesis); bad tags are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_grammars import bound_grammar, completes

from pdserve.config.sampling_params import SamplingParams
from pdserve.grammar_check import check_grammar
from pdserve.worker.grammar import RequestGrammar

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
STRUCTURES = {
    "structures": [
        {"begin": "<function=weather>", "schema": WEATHER, "end": "</function>"},
        {"begin": "<function=time>", "schema": TIME, "end": "</function>"},
    ],
    "triggers": ["<function="],
}
SCHEMAS = {"weather": WEATHER, "time": TIME}
FREE_PIECES = ["Let me check. ", "ok", "\n", " <b>", "function", "=", "</function>", "{}", " 7"]
ARGUMENTS = [
    {"city": "Paris"}, {"city": "Oslo", "days": 3}, {"zone": "UTC"}, {"zone": "CET"},
    {"city": 5}, {"city": "Paris", "x": 1}, {"zone": "PST"}, {}, {"days": 2},
]  # fmt: skip


def grammar_for(model: Path, tag: object) -> RequestGrammar:
    return bound_grammar(model, SamplingParams(structural_tag=tag))  # type: ignore[arg-type]


def test_sglangs_shape_frees_the_text_and_holds_each_call(tiny_llama: Path) -> None:
    cases = {
        "No call needed.": True,
        'Checking.<function=weather>{"city": "Paris"}</function> Done.': True,
        '<function=time>{"zone": "UTC"}</function><function=weather>{"city": "A"}</function>': True,
        '<function=weather>{"city": 5}</function>': False,  # not the schema
        '<function=weather>{"zone": "UTC"}</function>': False,  # another tag's arguments
        '<function=lunch>{"city": "Paris"}</function>': False,  # no such tag after a trigger
        '<function=weather>{"city": "Paris"}': False,  # never closed
    }
    for text, ok in cases.items():
        assert completes(grammar_for(tiny_llama, STRUCTURES), text) is ok, text


def test_xgrammars_format_is_taken_as_it_is(tiny_llama: Path) -> None:
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<answer>", "end": "</answer>",
        "content": {"type": "json_schema", "json_schema": TIME},
    }}  # fmt: skip
    assert completes(grammar_for(tiny_llama, tag), '<answer>{"zone": "CET"}</answer>')
    assert not completes(grammar_for(tiny_llama, tag), 'Sure: <answer>{"zone": "CET"}</answer>')
    as_text = json.dumps(tag)  # SGLang's /generate sends the tag as JSON text
    assert completes(grammar_for(tiny_llama, as_text), '<answer>{"zone": "UTC"}</answer>')


def _reference(segments: list[tuple[str, object]]) -> bool:
    """Whether SGLang's structural tag allows the text the segments make: every call names a
    tag and its arguments validate against that tag's schema."""
    for kind, value in segments:
        if kind == "call":
            name, arguments = value  # type: ignore[misc]
            if name not in SCHEMAS:
                return False
            try:
                jsonschema.validate(arguments, SCHEMAS[name])
            except jsonschema.ValidationError:
                return False
    return True


segment = st.one_of(
    st.tuples(st.just("free"), st.lists(st.sampled_from(FREE_PIECES), max_size=4).map("".join)),
    st.tuples(
        st.just("call"),
        st.tuples(st.sampled_from(["weather", "time", "lunch"]), st.sampled_from(ARGUMENTS)),
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(segments=st.lists(segment, max_size=5))
def test_random_texts_against_jsonschema(tiny_llama: Path, segments: list) -> None:
    text = ""
    for kind, value in segments:
        if kind == "free":
            text += value
        else:
            name, arguments = value
            text += f"<function={name}>{json.dumps(arguments)}</function>"
    # Free text holds no trigger of its own ("function" and "=" pieces never make "<function=").
    assert text.count("<function=") == sum(kind == "call" for kind, _ in segments)
    assert completes(grammar_for(tiny_llama, STRUCTURES), text) is _reference(segments), text


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("{", "not JSON"),
        ("[1]", "expected a JSON object"),
        ({"structures": [], "triggers": ["<f="]}, "'structures' must be a non-empty list"),
        ({"structures": STRUCTURES["structures"]}, "'triggers' must be a non-empty list"),
        ({**STRUCTURES, "triggers": ["<call="]}, "does not match any trigger"),
        ({**STRUCTURES, "structures": [{"begin": "<function=a>", "schema": 1, "end": "x"}]},
         "'schema' must be a JSON schema"),
        ({"type": "structural_tag", "format": {"type": "bogus"}}, "bogus"),
        ({"type": "regex", "format": {"type": "any_text"}}, "expected {'type': 'structural_tag'"),
        ({"format": {"type": "tag", "begin": "<a>", "end": "</a>",
                     "content": {"type": "json_schema", "json_schema": {"type": "strin"}}}},
         "strin"),
    ],
)  # fmt: skip
def test_a_bad_structural_tag_is_refused_naming_it(tag: object, reason: str) -> None:
    with pytest.raises(ValueError, match=r"^structural_tag='.*' is invalid: ") as info:
        check_grammar(SamplingParams(structural_tag=tag))  # type: ignore[arg-type]
    assert reason in str(info.value)


def test_at_most_one_constraint_and_a_structural_tag_after_the_thinking(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="one constraint per request"):
        SamplingParams(regex="a", structural_tag=json.dumps(STRUCTURES))
    sampling = SamplingParams(structural_tag=STRUCTURES, grammar_after_reasoning="deepseek_r1")  # type: ignore[arg-type]
    g = bound_grammar(tiny_llama, sampling)
    text = 'I need <function=x> weather.</think>\n\n<function=time>{"zone": "UTC"}</function>'
    assert completes(g, text)
