"""Per-request sampling parameters, in SGLang's names, validated once where they enter."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

_EPS = 1e-6
_INT32_END = 2**31  # counts and token ids stay below it (tensors, msgpack)
_INT_RANGES = {  # key: (lowest, end), end excluded
    "max_new_tokens": (0, _INT32_END),
    "min_new_tokens": (0, _INT32_END),
    "top_k": (-1, _INT32_END),
    "n": (1, 129),
    "seed": (-(2**63), 2**64),  # anything int64 or uint64 (seed + i of n copies)
}
_FLOAT_RANGES = {  # key: (low, high, whether low itself is allowed)
    "temperature": (0.0, 100.0, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, True),
    "presence_penalty": (-2.0, 2.0, True),
}
_BOOL_KEYS = (
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "json_object",
)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]
# At most one per request.
GRAMMAR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag", "json_object")
# Those whose value is a grammar's text (a JSON schema or structural tag may come as an object).
GRAMMAR_TEXT_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # json_object: any JSON object (extra keys allowed)

GrammarKind = Literal["json_schema", "regex", "ebnf", "structural_tag", "json_object"]
# How reasoning models mark their thinking (router/reasoning.py): a grammar can start after it.
REASONING_PARSERS: tuple[str, ...] = ("deepseek_r1", "qwen3")


class GrammarSpec(NamedTuple):
    """What a constrained request's output must match: the kind and its text (the schema as
    JSON text, the regex, the EBNF grammar); compiled grammars are cached by this pair."""

    kind: GrammarKind
    text: str
    # The grammar holds the answer only, after a reasoning model's thinking (as this parser of
    # REASONING_PARSERS reads it); None: the whole output.
    after_reasoning: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # <= 1e-6 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL: divides positive logits of seen tokens
    frequency_penalty: float = 0.0  # OpenAI: minus count * penalty (generated tokens)
    presence_penalty: float = 0.0  # OpenAI: minus penalty if generated at least once
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Constrained output (at most one): a JSON schema (text, or an object given as one), a
    # regular expression, an EBNF grammar (GBNF: `root ::= ...`), a structural tag (SGLang's
    # `{"structures": [...], "triggers": [...]}` or xgrammar's `{"type": "structural_tag",
    # "format": ...}`, as text or an object), or any JSON object.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    json_object: bool = False
    # The constraint starts after the thinking (one of REASONING_PARSERS: how the model marks
    # it); the router sets it for chat when it runs a reasoning parser.
    grammar_after_reasoning: str | None = None

    def __post_init__(self) -> None:
        """Types checked and normalized (lists to tuples, ints to floats), ranges checked; every
        refusal is a ValueError that starts with `key=`."""
        for key in _INT_RANGES:
            if key != "seed" or self.seed is not None:
                _check_int(self, key)
        for key in _FLOAT_RANGES:
            _set(self, key, _checked_float(self, key))
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "true or false")
        if self.min_new_tokens > self.max_new_tokens:
            raise _bad(
                "min_new_tokens", self.min_new_tokens, f"<= max_new_tokens={self.max_new_tokens}"
            )
        if self.top_k < 1 and self.top_k not in (-1, 0):
            raise _bad("top_k", self.top_k, "-1 (off) or an integer >= 1")
        _set(self, "stop", _checked_stop(self.stop))
        _set(self, "stop_token_ids", _checked_token_ids("stop_token_ids", self.stop_token_ids))
        _set(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        _check_grammar_fields(self)
        # What the worker asks of a row every step, once (not fields: not compared or sent).
        greedy = self.temperature <= _EPS or self.top_k == 1
        penalties = (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )
        _set(self, "_is_greedy", greedy)
        _set(self, "_has_penalties", penalties)
        # Sampled with temperature / min-p / a seed at most (worker/light_sampling.py).
        light = not penalties and not self.logit_bias
        _set(self, "_is_light", light and (greedy or (self.top_k <= 0 and self.top_p >= 1.0)))
        # min_new_tokens bans what would end the request: stop ids, and EOS unless ignored.
        bans = self.min_new_tokens > 0 and (bool(self.stop_token_ids) or not self.ignore_eos)
        _set(self, "_min_new_tokens_bans", bans)

    @property
    def grammar(self) -> GrammarSpec | None:
        """The constraint on the output, if any (None: free text)."""
        after = self.grammar_after_reasoning
        if self.json_object:
            return GrammarSpec("json_object", JSON_OBJECT_SCHEMA, after)
        for kind in GRAMMAR_TEXT_KEYS:
            text = getattr(self, kind)
            if text is not None:
                return GrammarSpec(kind, text, after)
        return None

    @property
    def is_greedy(self) -> bool:
        return self._is_greedy  # type: ignore[attr-defined,no-any-return]

    @property
    def has_penalties(self) -> bool:
        return self._has_penalties  # type: ignore[attr-defined,no-any-return]

    @property
    def min_new_tokens_bans(self) -> bool:
        """Whether min_new_tokens bans any token until it is reached: stop_token_ids, and EOS
        unless ignore_eos (an EOS that ends nothing is not banned, as in vLLM)."""
        return self._min_new_tokens_bans  # type: ignore[attr-defined,no-any-return]

    @property
    def is_light(self) -> bool:
        """Greedy, or temperature with min-p and a seed at most: no penalties, logit bias, top-k
        or top-p (the worker's light sampling path; the request's other asks aside)."""
        return self._is_light  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """From a request's JSON dict; unknown keys are refused with their names, None means
        the default, and every bad value is a ValueError naming its key."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling_params={_short(d)} is invalid: expected an object")
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {_short(unknown)}")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return d


# ---------------------------------------------------------------------- checks


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut (a refused value may be megabytes) and safe to encode (surrogates)."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={_short(value)} is invalid: expected {expected}")


def _set(params: SamplingParams, key: str, value: Any) -> None:
    object.__setattr__(params, key, value)  # normalizing a frozen instance in __post_init__


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def has_surrogates(text: str) -> bool:
    """True for a str that is not valid Unicode text (a lone UTF-16 surrogate, from JSON)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_int(params: SamplingParams, key: str) -> None:
    value = getattr(params, key)
    low, end = _INT_RANGES[key]
    if not is_int(value) or not low <= value < end:
        raise _bad(key, value, f"an integer in [{low}, {end - 1}]")


def _checked_float(params: SamplingParams, key: str) -> float:
    value = getattr(params, key)
    low, high, low_ok = _FLOAT_RANGES[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(key, value, "a finite number")
    if not (low <= value if low_ok else low < value) or value > high:
        raise _bad(key, value, f"a number in {'[' if low_ok else '('}{low:g}, {high:g}]")
    return float(value)


def _checked_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)):
        raise _bad("stop", stop, "a string or a list of strings")
    for s in stop:
        if not isinstance(s, str) or not s or has_surrogates(s):
            raise _bad("stop", stop, "non-empty strings of valid Unicode text")
    return tuple(stop)


def _checked_token_ids(key: str, ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)):
        raise _bad(key, ids, "a list of token ids")
    for t in ids:
        if not is_int(t) or not 0 <= t < _INT32_END:
            raise _bad(key, ids, f"token ids (integers in [0, {_INT32_END - 1}])")
    return tuple(ids)


def _check_grammar_fields(params: SamplingParams) -> None:
    """At most one constraint; each a non-empty text of valid Unicode. A JSON schema or a
    structural tag given as an object (a dict, as `response_format` carries it) becomes its JSON
    text. Whether xgrammar can compile it is checked where the tokenizer is
    (`pdserve/grammar_check.py`)."""
    if isinstance(params.json_schema, (dict, bool)):
        _set(params, "json_schema", json.dumps(params.json_schema))
    if isinstance(params.structural_tag, dict):
        _set(params, "structural_tag", json.dumps(params.structural_tag))
    for key in GRAMMAR_TEXT_KEYS:
        text = getattr(params, key)
        if text is not None and (not isinstance(text, str) or not text or has_surrogates(text)):
            raise _bad(key, text, "a non-empty string of valid Unicode text")
    after = params.grammar_after_reasoning
    if after is not None and after not in REASONING_PARSERS:
        raise _bad("grammar_after_reasoning", after, f"one of {list(REASONING_PARSERS)}")
    given = [key for key in GRAMMAR_KEYS if getattr(params, key) not in (None, False)]
    if len(given) > 1:
        raise ValueError(
            f"{given[0]}= and {given[1]}= are both set: expected at most one of "
            f"{', '.join(GRAMMAR_KEYS)} (one constraint per request)"
        )


def _checked_logit_bias(bias: Any) -> dict[int, float]:
    """{token id: bias}; JSON's string keys ("42") become ints."""
    if not isinstance(bias, dict):
        raise _bad("logit_bias", bias, "an object mapping token ids to numbers")
    out = {}
    for key, value in bias.items():
        token_id = (
            int(key)
            if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12
            else key
        )
        if not is_int(token_id) or not 0 <= token_id < _INT32_END:
            raise _bad("logit_bias", {key: value}, f"token ids in [0, {_INT32_END - 1}] as keys")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise _bad("logit_bias", {key: value}, "biases in [-100, 100]")
        out[token_id] = float(value)
    return out
