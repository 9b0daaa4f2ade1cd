"""Reasoning apart from the answer: the two parsers on whole answers, and a streamed choice that
gives the same reasoning and content however its text is cut into deltas."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "content"),
    [
        ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.\n", "Paris."),
        ("qwen3", "Paris.", None, "Paris."),  # enable_thinking false: no tags
        ("qwen3", "<think>\nStill going", "Still going", ""),  # cut off while thinking
        ("qwen3", "The tag </think> in an answer", None, "The tag </think> in an answer"),
        ("deepseek_r1", "Let me see.\n</think>\n\nParis.", "Let me see.\n", "Paris."),
        ("deepseek_r1", "<think>\nHm.</think>Paris.", "Hm.", "Paris."),
        ("deepseek_r1", "Thinking without an end", "Thinking without an end", ""),
    ],
)
def test_whole_answers_are_split_at_the_closing_tag(
    parser: str, text: str, reasoning: str | None, content: str
) -> None:
    assert split_reasoning(text, parser) == (reasoning, content)


PIECES = ["<think>", "</think>", "<", "</th", "<thi", "nk>", "\n", " ", "a", "b.", "think>", "/"]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    parser=st.sampled_from(["qwen3", "deepseek_r1"]),
    pieces=st.lists(st.sampled_from(PIECES), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_a_streamed_choice_splits_as_the_whole_answer_does(
    parser: str, pieces: list[str], seed: int
) -> None:
    text = "".join(pieces)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1))) if len(text) > 1 else []
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    stream = ReasoningStream(parser)
    reasoning = content = ""
    for delta in deltas:
        r, c = stream.feed(delta)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    reasoning, content = reasoning + r, content + c
    want_reasoning, want_content = split_reasoning(text, parser)
    assert (reasoning, content) == (want_reasoning or "", want_content), (text, deltas)
