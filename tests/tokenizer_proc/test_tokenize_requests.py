"""The tokenizer process's answers to /tokenize and /detokenize (TokenizerCore.on_tokenize): the
ids a generation request would get, the tokenizer's own decode, and refusals as answers."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import DetokenizeReq, GenerateReq, TokenizeReq
from pdserve.tokenizer_proc.chat_template import apply_chat_template
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore

TEXTS = ["The keeper climbed the stairs", "ça va, 東京は大きい。", ""]
CHAT = [{"role": "user", "content": "Tell me about the lighthouse."}]


@pytest.fixture
def core(tokenizer: Any) -> TokenizerCore:
    return TokenizerCore(tokenizer, idx=0, max_context_len=256, num_workers=1)


def test_texts_get_the_ids_a_generate_request_gets(core: TokenizerCore, tokenizer: Any) -> None:
    out = core.on_tokenize(TokenizeReq(rid="t", texts=TEXTS, return_token_strs=True))
    assert out.error is None and out.rid == "t" and out.max_context_len == 256
    sampling = SamplingParams(max_new_tokens=1).to_dict()
    for text, ids in zip(TEXTS[:2], out.token_ids):
        _, tokenized = core.on_generate(GenerateReq(rid=text, sampling=sampling, text=text))
        assert ids == tokenized.input_ids
    assert out.token_ids[2] == list(tokenizer.encode("", add_special_tokens=True))
    assert out.token_strs == [tokenizer.convert_ids_to_tokens(ids) for ids in out.token_ids]
    bare = core.on_tokenize(TokenizeReq(rid="u", texts=TEXTS, add_special_tokens=False))
    assert bare.token_ids == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert bare.token_strs is None


def test_a_chat_gets_the_ids_of_its_template(core: TokenizerCore, tokenizer: Any) -> None:
    out = core.on_tokenize(TokenizeReq(rid="t", messages=CHAT, add_special_tokens=False))
    assert out.token_ids == [apply_chat_template(tokenizer, CHAT)]
    open_turn = CHAT + [{"role": "assistant", "content": "It stands"}]
    cont = core.on_tokenize(
        TokenizeReq(
            rid="c", messages=open_turn, add_special_tokens=False, continue_final_message=True
        )
    )
    assert cont.token_ids == [
        apply_chat_template(tokenizer, open_turn, continue_final_message=True)
    ]


def test_detokenize_is_the_tokenizers_decode(core: TokenizerCore, tokenizer: Any) -> None:
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    with_special = ids[0] + [tokenizer.eos_token_id]
    out = core.on_tokenize(DetokenizeReq(rid="d", token_ids=[*ids, with_special]))
    assert out.error is None and out.texts[:3] == TEXTS  # unicode round-trips
    assert out.texts[3] == TEXTS[0]  # special tokens skipped by default, as SGLang
    kept = core.on_tokenize(DetokenizeReq("d", [with_special], skip_special_tokens=False))
    assert kept.texts == [tokenizer.decode(with_special, skip_special_tokens=False)]
    assert kept.texts[0].endswith(tokenizer.eos_token)


@pytest.mark.parametrize(
    ("msg", "error"),
    [
        (DetokenizeReq("d", [[1], [5, 100000]]), r"^tokens=\[100000\] is invalid"),
        (TokenizeReq("t", messages=[{"content": "x"}]), "has no 'role'"),
        (
            TokenizeReq("t", messages=CHAT, continue_final_message=True),
            "continue_final_message needs the last message to be from the assistant",
        ),
    ],
)
def test_a_bad_request_is_answered_with_its_error_never_raised(
    core: TokenizerCore, msg: Any, error: str
) -> None:
    out = core.on_tokenize(msg)
    assert out.rid == msg.rid and out.token_ids == [] and out.texts == []
    assert out.error is not None and re.search(error, out.error), out.error
