"""vLLM's `return_tokens_as_token_ids`: logprobs name each token, and each alternative, by its
id ("token_id:N"), on chat and completions, whole and streamed, echoed prompts included. The
reference: the same greedy request without the flag, whose token texts are the tokenizer's
decoding of those ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

MODEL = "llama"
PROMPT = "The lighthouse keeper said"
AS_IDS = {"return_tokens_as_token_ids": True}


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ids_of(names: list[str]) -> list[int]:
    assert all(name.startswith("token_id:") for name in names), names
    return [int(name.split(":", 1)[1]) for name in names]


def test_completions_name_tokens_by_id(pd_cluster: Cluster, tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    c = client(pd_cluster)
    common: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6,
                              "temperature": 0, "logprobs": 2}  # fmt: skip
    plain = c.completions.create(**common).choices[0].logprobs
    by_id = c.completions.create(**common, extra_body=AS_IDS).choices[0].logprobs
    assert plain is not None and by_id is not None
    ids = ids_of(by_id.tokens or [])
    assert [tokenizer.decode([i]) for i in ids] == plain.tokens
    # the second run reads the prompt from the prefix cache: the same values to float error
    assert by_id.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-4)
    for alts in by_id.top_logprobs or []:
        ids_of(list(alts))
    echoed = c.completions.create(**{**common, "max_tokens": 1, "echo": True}, extra_body=AS_IDS)
    assert echoed.choices[0].logprobs is not None
    prompt_ids = tokenizer.encode(PROMPT)
    names = echoed.choices[0].logprobs.tokens or []
    assert ids_of(names)[: len(prompt_ids)] == prompt_ids
    chunks = c.completions.create(**common, stream=True, extra_body=AS_IDS)
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.tokens or []]  # fmt: skip
    assert ids_of(streamed) == ids


def test_chat_names_tokens_by_id(pd_cluster: Cluster, tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    c = client(pd_cluster)
    common: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                              "max_tokens": 6, "temperature": 0, "logprobs": True,
                              "top_logprobs": 2}  # fmt: skip
    plain = c.chat.completions.create(**common).choices[0].logprobs
    by_id = c.chat.completions.create(**common, extra_body=AS_IDS).choices[0].logprobs
    assert plain is not None and plain.content and by_id is not None and by_id.content
    ids = ids_of([t.token for t in by_id.content])
    assert [tokenizer.decode([i]) for i in ids] == [t.token for t in plain.content]
    for token in by_id.content:
        assert token.bytes == list(token.token.encode())
        ids_of([alt.token for alt in token.top_logprobs])
