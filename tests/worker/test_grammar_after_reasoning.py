"""A grammar that starts after a reasoning model's thinking (`grammar_after_reasoning`, set by the
router for a constrained chat request when it runs a reasoning parser): compiled on the tiny
model's real tokenizer, its matcher takes any thinking that does not close early, then blank
characters, then only what the answer's grammar allows; `qwen3` lets the model answer at once,
`deepseek_r1` starts the output inside the thinking (its template opened it). The reference is
Python's `re` on the answer part, on random thinking texts and answers (hypothesis)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_grammars import bound_grammar, completes, takes
from transformers import AutoTokenizer

from pdserve.config.sampling_params import SamplingParams
from pdserve.grammar_check import check_grammar
from pdserve.worker.grammar import RequestGrammar, backend_for
from pdserve.worker.grammar_mask import fill_bitmask, unpack_bitmask

ANSWER = "[0-9]{2,4}"  # the answer's grammar in these tests
SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
# Thinking texts: words, markup pieces, a lone closing bracket, blank characters.
THOUGHT_PIECES = ["Hmm", " 42", "<think>", "</", "think", ">", "<", "/", "\n", " ", "ok.", "{}"]


def grammar_for(model: Path, parser: str, **constraint: object) -> RequestGrammar:
    sampling = SamplingParams(grammar_after_reasoning=parser, **constraint)  # type: ignore[arg-type]
    return bound_grammar(model, sampling)


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_thinking_then_an_answer_that_matches(tiny_llama: Path, parser: str) -> None:
    opened = "<think>\n" if parser == "qwen3" else ""
    cases = {
        f"{opened}Hmm, 12 or 1234? <b>x</b></think>\n\n1234": True,  # the answer after thinking
        f"{opened}Hmm</think>12": True,  # no blank line
        f"{opened}Hmm</think>\n\nabc": False,  # not the answer's grammar
        f"{opened}Hmm</think>\n\n12345": False,  # too long an answer
        f"{opened}Hmm</think>" + " " * 9 + "12": False,  # more blank than allowed
        f"{opened}Hmm</think>\n\n12</think>": False,  # nothing past the answer
    }
    for text, ok in cases.items():
        assert completes(grammar_for(tiny_llama, parser, regex=ANSWER), text) is ok, text
    # The answer at once: qwen3's model may skip the thinking; deepseek_r1's output is inside it.
    assert completes(grammar_for(tiny_llama, parser, regex=ANSWER), "1234") is (parser == "qwen3")
    # qwen3's thinking opens with the tag or not at all; deepseek_r1's prompt opened it.
    assert takes(grammar_for(tiny_llama, parser, regex=ANSWER), "Hmm</think>") is (
        parser == "deepseek_r1"
    )


def test_a_json_schema_answer_after_thinking(tiny_llama: Path) -> None:
    ok = '<think>Is {"a": "x"} right? No.</think>\n\n{"a": 7}'
    assert completes(grammar_for(tiny_llama, "qwen3", json_schema=SCHEMA), ok)
    bad = '<think>Hmm</think>\n\n{"a": "x"}'
    assert not takes(grammar_for(tiny_llama, "qwen3", json_schema=SCHEMA), bad)
    extra = '<think>Hmm</think>{"a": 7, "b": 1}'  # strict: no properties beyond the schema's
    assert not takes(grammar_for(tiny_llama, "qwen3", json_schema=SCHEMA), extra)
    assert completes(grammar_for(tiny_llama, "deepseek_r1", json_object=True), 'x</think>{"b": 1}')


def test_the_mask_frees_the_thinking_and_holds_the_answer(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    g = grammar_for(tiny_llama, "deepseek_r1", regex=ANSWER)
    size = backend_for(512, str(tiny_llama)).vocab_size
    letters = [i for t, i in tok.get_vocab().items() if t.isascii() and t.isalpha() and i < size]
    digits = [i for t, i in tok.get_vocab().items() if t.isascii() and t.isdigit() and i < size]
    eos = tok.eos_token_id

    def allowed() -> torch.Tensor:
        bitmask = fill_bitmask([g], size)
        assert bitmask is not None
        return unpack_bitmask(bitmask, size)[0]

    thinking = allowed()
    assert bool(thinking[letters].all()) and bool(thinking[digits].all())
    assert not bool(thinking[eos]), "the output may not end while thinking"
    assert takes(g, "Let me see</think>\n")
    answer = allowed()
    assert not bool(answer[letters].any()) and bool(answer[digits].all())
    assert not bool(answer[eos]), "the answer's grammar needs two digits first"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.sampled_from(THOUGHT_PIECES), max_size=12),
    blank=st.text(alphabet=" \n\t", max_size=10),
    answer=st.text(alphabet="0123456789ab", max_size=6),
    parser=st.sampled_from(["qwen3", "deepseek_r1"]),
)
def test_any_thinking_then_the_answer_as_re_reads_it(
    tiny_llama: Path, pieces: list[str], blank: str, answer: str, parser: str
) -> None:
    thought = "".join(pieces)
    opened = "<think>" if parser == "qwen3" else ""
    text = f"{opened}{thought}</think>{blank}{answer}"
    # The reference: the first </think> ends the thinking; then <= 8 blanks, then the answer.
    end = text.index("</think>")
    rest = text[end + len("</think>") :]
    expected = re.fullmatch(r"[ \t\r\n]{0,8}" + ANSWER, rest) is not None
    assert completes(grammar_for(tiny_llama, parser, regex=ANSWER), text) is expected, text


def test_a_bad_answer_grammar_or_parser_is_named(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match=r"^regex='\[0-9' is invalid: "):
        check_grammar(SamplingParams(regex="[0-9", grammar_after_reasoning="qwen3"))
    with pytest.raises(ValueError, match=r"^grammar_after_reasoning='r1' is invalid: expected one"):
        SamplingParams(regex="a", grammar_after_reasoning="r1")
    free = SamplingParams(grammar_after_reasoning="qwen3")  # no constraint: nothing to start
    assert free.grammar is None
