"""vLLM's guided_choice becomes a regex of its strings, special characters escaped: compiled by
xgrammar on the tiny model's tokenizer (as a worker compiles it), it accepts each choice whole
and nothing else; Python's `re` is the reference (hypothesis, random strings of regex syntax)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_grammars import bound_grammar, completes

from pdserve.config.sampling_params import SamplingParams
from pdserve.router.openai_serving import _choice_regex

ALPHABET = "ab \\^$.|?*+()[]{}/-é\"'"


def accepts(model: Path, regex: str, text: str) -> bool:
    return completes(bound_grammar(model, SamplingParams(regex=regex)), text)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    choices=st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4),
    other=st.text(ALPHABET, min_size=1, max_size=6),
)
def test_each_choice_and_nothing_else(tiny_llama: Path, choices: list[str], other: str) -> None:
    regex = _choice_regex(choices)
    assert regex is not None
    for choice in choices:
        assert re.fullmatch(regex, choice)
        assert accepts(tiny_llama, regex, choice), (regex, choice)
    expected = other in choices
    assert bool(re.fullmatch(regex, other)) is expected
    assert accepts(tiny_llama, regex, other) is expected, (regex, other)
