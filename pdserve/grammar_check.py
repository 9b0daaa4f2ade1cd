"""Whether a constrained request's grammar (JSON schema, regex, EBNF) is one xgrammar can compile,
checked by parsing it (no vocabulary needed, so cheap): the tokenizer process refuses a bad one
before it is queued, and a worker checks again before it compiles (the in-process Engine has no
tokenizer process). Both remember recent answers by the grammar's text.

xgrammar is imported on first use, so processes that never see a grammar never load it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pdserve.config.sampling_params import GrammarSpec, SamplingParams

_CACHE_SIZE = 1024
# xgrammar's C++ errors start with a time stamp and a source location; clients need the rest.
_LOCATION = re.compile(r"^\[[\d:]+\] [^ ]+:\d+: (Check failed: \(.*?\) is false: )?")
_MAX_QUOTED_CHARS = 60
_MAX_REASON_CHARS = 400
# xgrammar's schema parser slows with nesting faster than with size (one CPU core: 0.04 s at 129
# levels of JSON, 0.3 s at 257, 9.7 s at 801, benchmarks/grammar_limits.py) and runs in the
# tokenizer process's loop: deeper schemas are refused. 128 levels hold 63 nested objects.
MAX_SCHEMA_DEPTH = 128
# What the reasoning parsers mark thinking with (router/reasoning.py), and the blank characters
# allowed between it and a constrained answer (models write a blank line).
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_MAX_BLANK_AFTER_THINKING = 8
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def check_grammar(params: SamplingParams) -> None:
    """ValueError naming the constraint and the problem when `params` asks for a grammar that
    cannot be compiled (`json_schema='{...' is invalid: ...`); nothing for free text."""
    spec = params.grammar
    if spec is None:
        return
    problem = grammar_problem(spec)
    if problem is not None:
        raise ValueError(problem)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def grammar_problem(spec: GrammarSpec) -> str | None:
    """Why `spec` cannot be compiled (a message starting with its key), or None."""
    if spec.kind in ("json_schema", "structural_tag"):
        depth = json_depth(spec.text)
        if depth > MAX_SCHEMA_DEPTH:
            return (
                f"{spec.kind}={_quoted(spec.text)} is invalid: it nests {depth} levels deep; "
                f"expected at most {MAX_SCHEMA_DEPTH}"
            )
    try:
        full_grammar_text(spec) if spec.after_reasoning is not None else answer_grammar(spec)
    except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError
        return f"{spec.kind}={_quoted(spec.text)} is invalid: {xgrammar_reason(e)}"
    return None


def answer_grammar(spec: GrammarSpec) -> Any:
    """The xgrammar.Grammar of `spec`'s own text (the answer's, without any thinking before it);
    xgrammar's RuntimeError when it does not parse. A json_schema is strict (no properties or
    items beyond the schema's, as SGLang and vLLM do); json_object is any object."""
    import xgrammar as xgr

    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.text)
    if spec.kind == "ebnf":
        return xgr.Grammar.from_ebnf(spec.text)
    if spec.kind == "structural_tag":
        return xgr.Grammar.from_structural_tag(structural_tag_json(spec.text))
    return xgr.Grammar.from_json_schema(spec.text, strict_mode=spec.kind == "json_schema")


def structural_tag_json(text: str) -> str:
    """A structural tag as xgrammar reads it (`{"type": "structural_tag", "format": ...}`), from
    that shape or SGLang's (`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`:
    free text until a trigger, then a tag whose content is JSON matching its schema, then free
    text again); ValueError naming what is wrong."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(tag, dict):
        raise ValueError("expected a JSON object")
    if "format" in tag:
        if tag.get("type", "structural_tag") != "structural_tag" or set(tag) - {"type", "format"}:
            raise ValueError("expected {'type': 'structural_tag', 'format': {...}}")
        return json.dumps({"type": "structural_tag", "format": tag["format"]})
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if set(tag) - {"type", "structures", "triggers"} or tag.get("type", "structural_tag") != (
        "structural_tag"
    ):
        raise ValueError("expected 'structures' and 'triggers' (SGLang's shape) or 'format'")
    if not isinstance(structures, list) or not structures:
        raise ValueError("'structures' must be a non-empty list of {'begin', 'schema', 'end'}")
    if not isinstance(triggers, list) or not triggers:
        raise ValueError("'triggers' must be a non-empty list of strings")
    if not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("'triggers' must be a non-empty list of strings")
    tags = []
    for item in structures:
        ok = isinstance(item, dict) and set(item) == {"begin", "schema", "end"}
        if not ok or not all(isinstance(item[k], str) and item[k] for k in ("begin", "end")):
            raise ValueError(
                "each of 'structures' must be {'begin': str, 'schema': ..., 'end': str}"
            )
        if not isinstance(item["schema"], (dict, bool)):
            raise ValueError("each structure's 'schema' must be a JSON schema (an object)")
        content = {"type": "json_schema", "json_schema": item["schema"]}
        tags.append({"type": "tag", "begin": item["begin"], "content": content, "end": item["end"]})
    fmt = {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return json.dumps({"type": "structural_tag", "format": fmt})


def full_grammar_text(spec: GrammarSpec) -> str:
    """The EBNF text of what the whole output must match when the grammar starts after the
    thinking (`spec.after_reasoning` set): the thinking as the parser marks it, any text but the
    closing tag (`deepseek_r1`: the prompt opened it, so the output starts inside; `qwen3`: the
    model opens it or answers at once), a few blank characters, then the answer's grammar."""
    import xgrammar as xgr

    think: dict[str, Any] = {
        "type": "tag",
        "begin": _THINK_OPEN if spec.after_reasoning == "qwen3" else "",
        "content": {"type": "any_text"},
        "end": _THINK_CLOSE,
    }
    if spec.after_reasoning == "qwen3":
        think = {"type": "optional", "content": think}
    blank = {"type": "regex", "pattern": f"[ \\t\\r\\n]{{0,{_MAX_BLANK_AFTER_THINKING}}}"}
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [think, blank]}}
    thinking = xgr.Grammar.from_structural_tag(json.dumps(tag))
    return str(xgr.Grammar.concat(thinking, answer_grammar(spec)))


def json_depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest (brackets inside strings not counted); no
    recursion, so any depth is measured."""
    depth = deepest = 0
    for char in _JSON_STRING.sub("", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def xgrammar_reason(error: Exception) -> str:
    """An xgrammar error's message without its C++ source location, on one line, short."""
    lines = [_LOCATION.sub("", line).strip() for line in str(error).strip().splitlines()]
    reason = " ".join(line for line in lines if line) or type(error).__name__
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS] + "..."
    return reason


def _quoted(text: str) -> str:
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[:_MAX_QUOTED_CHARS] + "..."
    return repr(text)
