"""vLLM's `truncate_prompt_tokens`: the tokenizer keeps the prompt's last N tokens (-1: as many
as the context allows) of text, chat messages or token ids, after encoding the whole prompt (a
prompt too long for the context is then served, not refused); not with images. The reference:
the same tokenizer's ids of the whole prompt, cut in Python."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import GenerateReq
from pdserve.tokenizer_proc.chat_template import render_chat
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore

CONTEXT = 64
WORDS = ["lighthouse", "keeper", "storm", "the", "a", "night", "sea", "light", "rock", "ship"]


def text(seed: int, num_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def req(keep: int, max_new_tokens: int = 4, **prompt: Any) -> GenerateReq:
    sampling = SamplingParams(max_new_tokens=max_new_tokens).to_dict()
    return GenerateReq(rid="r", sampling=sampling, truncate_prompt_tokens=keep, **prompt)


@pytest.fixture
def core(tokenizer: Any) -> TokenizerCore:
    return TokenizerCore(tokenizer, idx=0, max_context_len=CONTEXT, num_workers=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_last_tokens_of_text_messages_and_ids(core: TokenizerCore, tokenizer: Any, seed):
    prompt = text(seed, 12)
    whole = tokenizer.encode(prompt)
    assert len(whole) + 4 + 16 <= CONTEXT  # the chat template's tokens fit too
    keep = random.Random(seed).randint(1, len(whole) - 1)
    assert core.prepare(req(keep, text=prompt)).input_ids == whole[-keep:]
    assert core.prepare(req(len(whole) + 5, text=prompt)).input_ids == whole  # shorter: as is
    messages = [{"role": "user", "content": prompt}]
    rendered = tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False)
    assert core.prepare(req(keep, messages=messages)).input_ids == rendered[-keep:]
    assert core.prepare(req(keep, input_ids=whole)).input_ids == whole[-keep:]


def test_a_prompt_longer_than_the_context_is_cut_to_it(core: TokenizerCore, tokenizer: Any):
    prompt = text(7, 300)
    whole = tokenizer.encode(prompt)
    assert len(whole) > 4 * CONTEXT
    with pytest.raises(ValueError, match="prompt"):  # without truncation: refused
        core.prepare(req(0, text=prompt))
    assert core.prepare(req(-1, max_new_tokens=0, text=prompt)).input_ids == whole[-CONTEXT:]
    assert core.prepare(req(10, text=prompt)).input_ids == whole[-10:]
    # -1 keeps the context's worth; with tokens to generate as well it no longer fits (vLLM)
    with pytest.raises(ValueError, match="prompt"):
        core.prepare(req(-1, max_new_tokens=4, text=prompt))


def test_not_with_images(core: TokenizerCore) -> None:
    with pytest.raises(ValueError, match="^truncate_prompt_tokens cannot be used with images"):
        core.kept_tokens(req(5, text="a"), images=object())  # type: ignore[arg-type]
