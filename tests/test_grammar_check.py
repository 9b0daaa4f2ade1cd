"""The grammar fields of SamplingParams, and the parse check the tokenizer process and workers run
before a grammar is compiled: a bad JSON schema, regex or EBNF grammar is a ValueError naming the
field and xgrammar's reason (without its C++ source location)."""

from __future__ import annotations

import json

import pytest

from pdserve.config.sampling_params import GrammarSpec, SamplingParams
from pdserve.grammar_check import check_grammar, grammar_problem, xgrammar_reason

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
