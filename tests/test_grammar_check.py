"""The grammar fields of SamplingParams, and the parse check the tokenizer process and workers run
before a grammar is compiled: a bad JSON schema, regex or EBNF grammar is a ValueError naming the
field and xgrammar's reason (without its C++ source location)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.config.sampling_params import GrammarSpec, SamplingParams
from pdserve.grammar_check import (
    MAX_SCHEMA_DEPTH,
    check_grammar,
    grammar_problem,
    json_depth,
    xgrammar_reason,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_each_constraint_is_one_grammar_spec() -> None:
    assert SamplingParams().grammar is None
    assert SamplingParams(regex="a+").grammar == GrammarSpec("regex", "a+")
    assert SamplingParams(ebnf='root ::= "a"').grammar == GrammarSpec("ebnf", 'root ::= "a"')
    assert SamplingParams(json_object=True).grammar == GrammarSpec(
        "json_object", '{"type": "object"}'
    )
    given_as_object = SamplingParams.from_dict({"json_schema": SCHEMA})
    assert given_as_object.grammar == GrammarSpec("json_schema", json.dumps(SCHEMA))
    assert SamplingParams.from_dict(given_as_object.to_dict()) == given_as_object  # the wire


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regex": "a", "json_schema": "{}"}, "json_schema= and regex= are both set"),
        ({"ebnf": 'root ::= "a"', "json_object": True}, "ebnf= and json_object= are both set"),
        ({"regex": ""}, "regex='' is invalid: expected a non-empty string"),
        ({"regex": 5}, "regex=5 is invalid"),
        ({"ebnf": "ok \ud800"}, "ebnf='ok \\ud800' is invalid"),
        ({"json_object": "yes"}, "json_object='yes' is invalid: expected true or false"),
    ],
)
def test_bad_grammar_fields_are_refused_naming_them(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict(fields)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"json_schema": '{"type": "strin"}'}, 'json_schema=\'{"type": "strin"}\' is invalid: '
                                               'Unsupported type "strin"'),
        ({"json_schema": "not json"}, "json_schema='not json' is invalid: Failed to parse JSON"),
        ({"json_schema": "[1, 2]"}, "json_schema='[1, 2]' is invalid: Schema should be an object"),
        ({"regex": "(ab"}, "regex='(ab' is invalid: Regex parsing error at position 4: "
                           "The parenthesis is not closed."),
        ({"regex": "a(?=b)"}, "regex='a(?=b)' is invalid: Regex parsing error"),
        ({"ebnf": 'start ::= "a"'}, "ebnf='start ::= \"a\"' is invalid: EBNF parser error"),
    ],
)  # fmt: skip
def test_grammars_xgrammar_cannot_parse_are_refused_with_its_reason(
    fields: dict, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        check_grammar(SamplingParams.from_dict(fields))
    assert str(info.value).startswith(message)
    assert ".cc:" not in str(info.value) and "\n" not in str(info.value)


def test_good_grammars_pass_and_answers_are_remembered_by_text() -> None:
    check_grammar(SamplingParams())
    for fields in ({"json_schema": SCHEMA}, {"regex": "[0-9]{3}"}, {"json_object": True},
                   {"ebnf": 'root ::= "yes" | "no"'}):  # fmt: skip
        check_grammar(SamplingParams.from_dict(fields))
    before = grammar_problem.cache_info().hits
    check_grammar(SamplingParams(regex="[0-9]{3}"))
    assert grammar_problem.cache_info().hits == before + 1


def test_a_long_reason_is_cut() -> None:
    reason = xgrammar_reason(RuntimeError("[01:02:03] /p/a.cc:12: " + "x" * 1000))
    assert reason.startswith("xxx") and len(reason) < 420


def _nested_arrays(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels - 1):
        schema = {"type": "array", "items": schema}
    return schema  # `levels` objects deep: JSON depth `levels`


def test_a_schema_deeper_than_the_limit_is_refused_before_xgrammar_parses_it() -> None:
    at_limit = json.dumps(_nested_arrays(MAX_SCHEMA_DEPTH))
    assert json_depth(at_limit) == MAX_SCHEMA_DEPTH
    check_grammar(SamplingParams(json_schema=at_limit))
    # xgrammar would take minutes over it (and json.dumps cannot write it)
    too_deep = '{"type": "array", "items": ' * 4999 + '{"type": "integer"}' + "}" * 4999
    with pytest.raises(ValueError) as info:
        check_grammar(SamplingParams(json_schema=too_deep))
    assert str(info.value).startswith("json_schema='{")
    assert str(info.value).endswith(
        f"it nests 5000 levels deep; expected at most {MAX_SCHEMA_DEPTH}"
    )


def _depth(value: object) -> int:
    """The reference: nesting counted on the parsed value."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text('[]{}"\\ab'), kids, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 1]))
def test_json_depth_equals_the_depth_of_the_parsed_value(value: object, indent: int | None) -> None:
    assert json_depth(json.dumps(value, indent=indent)) == _depth(value)
