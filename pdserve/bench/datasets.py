"""Benchmark prompts: the random dataset (random token ids, sized in tokens) as text or token ids.

Like vLLM's random dataset: each prompt is drawn from the tokenizer's ordinary (non-special) ids,
decoded to text and re-encoded until its length in tokens is the target, so the server sees about
`input_len` tokens whatever its own tokenization does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NO_TOKENIZER = "none"  # --tokenizer value that means: send prompts as token ids
_MAX_FIT_ROUNDS = 10  # decode/re-encode rounds before accepting a prompt a few tokens off


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (OpenAI completions accept both)
    prompt_len: int  # tokens, by the benchmark's tokenizer (or the id count)
    output_len: int  # tokens asked for


def load_tokenizer(name: str | None) -> Any | None:
    """A transformers tokenizer for `name`, or None for `none`; raises ValueError if it fails."""
    if name is None or name == NO_TOKENIZER:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"tokenizer {name!r} could not be loaded ({e}); pass --tokenizer PATH, "
            f"or --tokenizer {NO_TOKENIZER} to send random token ids"
        ) from e


def token_pool(tokenizer: Any) -> np.ndarray:
    """The ids a random prompt may use: the base vocabulary without special tokens."""
    special = set(tokenizer.all_special_ids)
    ids = np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no ordinary tokens to build random prompts from")
    return ids


def text_token_pool(tokenizer: Any) -> np.ndarray:
    """Ordinary ids that decode alone to whole characters and re-encode to themselves.

    Random byte-level pieces would decode to U+FFFD, which re-encodes to several tokens, so a
    prompt built from them grows on every round trip; these ids keep the length steady.
    """
    ids = token_pool(tokenizer)
    texts = tokenizer.batch_decode([[int(i)] for i in ids])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep = [
        int(i) for i, text, enc in zip(ids, texts, encoded) if enc == [i] and "\ufffd" not in text
    ]
    return np.array(keep, dtype=np.int64) if keep else ids


def sample_lengths(
    num: int, mean_len: int, range_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Lengths uniform in [mean*(1-r), mean*(1+r)], at least 1 (vLLM's range ratio)."""
    low = max(1, int(mean_len * (1.0 - range_ratio)))
    high = max(low, int(mean_len * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def random_token_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    pool: Sequence[int] | np.ndarray,
) -> list[BenchRequest]:
    """Prompts as lists of token ids drawn from `pool` (no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool, dtype=np.int64)
    in_lens = sample_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = sample_lengths(num_prompts, output_len, range_ratio, rng)
    return [
        BenchRequest(rng.choice(pool, size=int(n_in)).tolist(), int(n_in), int(n_out))
        for n_in, n_out in zip(in_lens, out_lens)
    ]


def random_text_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[BenchRequest]:
    """Prompts as text that re-encodes to about the sampled number of tokens."""
    rng = np.random.default_rng(seed)
    pool = text_token_pool(tokenizer)
    in_lens = sample_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = sample_lengths(num_prompts, output_len, range_ratio, rng)
    requests = []
    for n_in, n_out in zip(in_lens, out_lens):
        text, n_tokens = fit_text(tokenizer, int(n_in), pool, rng)
        requests.append(BenchRequest(text, n_tokens, int(n_out)))
    return requests


def fit_text(
    tokenizer: Any, target_len: int, pool: np.ndarray, rng: np.random.Generator
) -> tuple[str, int]:
    """Random text of `target_len` tokens: decode, re-encode, trim or pad, repeat.

    Neighbouring tokens can merge or split when the text is re-encoded, so one round is not
    enough; returns the text and its true length, which in rare cases stays a token or two off.
    """
    ids = rng.choice(pool, size=target_len).tolist()
    best_text, best_len = "", 0
    for _ in range(_MAX_FIT_ROUNDS):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not best_text or abs(len(ids) - target_len) < abs(best_len - target_len):
            best_text, best_len = text, len(ids)
        if len(ids) == target_len:
            break
        if len(ids) > target_len:
            ids = ids[:target_len]
        else:
            ids = ids + rng.choice(pool, size=target_len - len(ids)).tolist()
    return best_text, best_len


def build_requests(
    tokenizer: Any | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    fallback_vocab_size: int,
) -> list[BenchRequest]:
    """Text prompts with a tokenizer, else token ids in [0, fallback_vocab_size)."""
    if tokenizer is not None:
        return random_text_requests(
            tokenizer, num_prompts, input_len, output_len, range_ratio, seed
        )
    pool = np.arange(fallback_vocab_size)
    return random_token_requests(num_prompts, input_len, output_len, range_ratio, seed, pool)
