"""OpenAI's two logprobs shapes: every alternative shows its own text (and, on chat, its bytes)."""

from __future__ import annotations

from pdserve.protocol import Finish, ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.openai_serving import chat_logprobs, completion_logprobs


def delta(**texts: list) -> ReqOutput:
    """Two tokens with two alternatives each; the second token's runner-up decodes to 'é'."""
    return ReqOutput(
        "r1", "Hi é", [10, 11], Finish.at_length(2), logprobs=[-0.25, -0.5],
        top_logprobs=[[[10, -0.25], [429, -2.0]], [[11, -0.5], [430, -1.0]]], **texts,
    )  # fmt: skip


WITH_TEXTS = {"token_texts": ["Hi", " é"], "top_token_texts": [["Hi", "Ho"], [" é", "é"]]}


def test_chat_alternatives_have_their_text_and_utf8_bytes() -> None:
    content = chat_logprobs(delta(**WITH_TEXTS), top_n=2)["content"]
    assert [t["token"] for t in content] == ["Hi", " é"]
    assert content[1]["bytes"] == [32, 0xC3, 0xA9]
    assert content[0]["top_logprobs"] == [
        {"token": "Hi", "logprob": -0.25, "bytes": list(b"Hi")},
        {"token": "Ho", "logprob": -2.0, "bytes": list(b"Ho")},
    ]
    assert content[1]["top_logprobs"][1] == {"token": "é", "logprob": -1.0, "bytes": [0xC3, 0xA9]}
    assert len(chat_logprobs(delta(**WITH_TEXTS), top_n=1)["content"][0]["top_logprobs"]) == 1


def test_completion_alternatives_are_keyed_by_their_text() -> None:
    shape, offset = completion_logprobs(delta(**WITH_TEXTS), top_n=2, text_offset=3)
    assert shape["tokens"] == ["Hi", " é"]
    assert shape["token_logprobs"] == [-0.25, -0.5]
    assert shape["top_logprobs"] == [{"Hi": -0.25, "Ho": -2.0}, {" é": -0.5, "é": -1.0}]
    assert shape["text_offset"] == [3, 5] and offset == 7


def test_completion_keeps_the_likelier_of_two_alternatives_with_one_text() -> None:
    texts = {"token_texts": ["Hi", " é"], "top_token_texts": [["Hi", "Hi"], ["\ufffd", "\ufffd"]]}
    shape, _ = completion_logprobs(delta(**texts), top_n=2, text_offset=0)
    assert shape["top_logprobs"] == [{"Hi": -0.25}, {"\ufffd": -0.5}]


def test_without_texts_tokens_are_named_by_id() -> None:
    content = chat_logprobs(delta(), top_n=2)["content"]
    assert [t["token"] for t in content] == ["token_id:10", "token_id:11"]
    assert [a["token"] for a in content[0]["top_logprobs"]] == ["token_id:10", "token_id:429"]


def test_a_choice_state_reads_like_its_deltas() -> None:
    choice = ChoiceState(0, "r1")
    choice.add(delta(**WITH_TEXTS))
    assert chat_logprobs(choice, top_n=2) == chat_logprobs(delta(**WITH_TEXTS), top_n=2)
