"""Twenty JSON schemas of varied shape and ten regular expressions, and the checks every output of
the tiny model must pass under them (the Engine, CPU end-to-end and GPU benchmark tests share
them). Strings are bounded (enum, pattern, maxLength) and so are numbers of items, so a model with
random weights ends its output well within the token budget.

xgrammar (0.2.9) lets raw control characters into strings bounded by minLength/maxLength (its issue
#800), which strict JSON parsers refuse: those outputs are parsed with `strict=False`.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import jsonschema


class Case(NamedTuple):
    name: str
    kind: str  # "json_schema" | "regex"
    grammar: Any  # the schema (a dict) or the regex


def _int(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props if required is None
                                                                  else required)}  # fmt: skip


SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": _obj(name={"enum": ["ann", "bob", "cy"]}, age=_int(0, 120)),
    "nested_object": _obj(
        user=_obj(id=_int(1, 9999), active={"type": "boolean"}), role={"enum": ["admin", "guest"]}
    ),  # fmt: skip
    "bounded_int_array": {"type": "array", "items": _int(0, 99), "minItems": 1, "maxItems": 4},
    "top_level_enum": {"enum": ["red", "green", "blue"]},
    "number_range": _obj(temp={"type": "number", "minimum": -40, "maximum": 60}),
    "optional_fields": _obj(
        ["a"], a={"type": "boolean"}, b={"type": "null"}, c={"enum": [1, 2, 3]}
    ),  # fmt: skip
    "string_pattern": _obj(code={"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}),
    "string_length": _obj(nick={"type": "string", "minLength": 1, "maxLength": 6}),
    "array_of_objects": {
        "type": "array",
        "items": _obj(x=_int(-5, 5), y=_int(-5, 5)),
        "minItems": 1,
        "maxItems": 3,
    },  # fmt: skip
    "const_field": _obj(version={"const": "1.0"}, ok={"type": "boolean"}),
    "any_of": {"anyOf": [_int(0, 10), {"enum": ["none"]}]},
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "boolean"}, {"enum": ["a", "b"]}],
        "items": False,
    },  # fmt: skip
    "refs": {
        "$defs": {"pt": _obj(x=_int(0, 9))},
        **_obj(a={"$ref": "#/$defs/pt"}, b={"$ref": "#/$defs/pt"}),
    },  # fmt: skip
    "deep_nesting": _obj(l1=_obj(l2=_obj(l3={"enum": [True, False, None]}))),
    "exclusive_range": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
    "fixed_length_array": {
        "type": "array",
        "items": {"enum": ["up", "down", "left", "right"]},
        "minItems": 2,
        "maxItems": 2,
    },  # fmt: skip
    "boolean": {"type": "boolean"},
    "scores": _obj(
        scores={
            "type": "array",
            "items": {"type": "number", "minimum": 0, "maximum": 1},
            "maxItems": 3,
        },
        total=_int(0, 3),
    ),  # fmt: skip
    "date_pattern": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    "closed_object": {
        **_obj(first={"enum": ["a", "b"]}, second=_int(1, 3), third={"type": "boolean"}),
        "additionalProperties": False,
    },  # fmt: skip
}
REGEXES: dict[str, str] = {
    "email": r"[a-z]{3,8}@[a-z]{2,6}\.(com|org|net)",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "answer": r"(yes|no|maybe)",
    "hex_colour": r"#[0-9a-f]{6}",
    "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    "name": r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}",
    "decimal": r"-?(0|[1-9]\d{0,5})(\.\d{1,3})?",
    "parenthesised": r"\((a|b|c){1,6}\)",
    "key_value": r"[a-z]{1,5}=[0-9]{1,3}(;[a-z]{1,5}=[0-9]{1,3}){0,3}",
}
CASES = [Case(f"schema-{k}", "json_schema", v) for k, v in SCHEMAS.items()] + [
    Case(f"regex-{k}", "regex", v) for k, v in REGEXES.items()
]
MAX_TOKENS = 480  # random weights pad JSON with whitespace: ~100-250 tokens per output


def sampling_fields(case: Case) -> dict[str, Any]:
    """The case as SGLang's sampling parameters (`json_schema` as text, `regex`)."""
    grammar = json.dumps(case.grammar) if case.kind == "json_schema" else case.grammar
    return {case.kind: grammar}


def response_format(case: Case) -> dict[str, Any]:
    """A schema case as OpenAI's `response_format`."""
    name = case.name.replace("-", "_")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": case.grammar}}


def check_output(case: Case, text: str) -> None:
    """AssertionError unless `text` parses and validates against the schema, or fully matches the
    regex."""
    if case.kind == "regex":
        assert re.fullmatch(case.grammar, text), f"{case.name}: {text!r} does not match"
        return
    strict = "minLength" not in json.dumps(case.grammar)  # xgrammar issue #800, above
    try:
        value = json.loads(text, strict=strict)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{case.name}: {text!r} is not JSON: {e}") from None
    try:
        jsonschema.validate(value, case.grammar)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{case.name}: {text!r} breaks the schema: {e.message}") from None
