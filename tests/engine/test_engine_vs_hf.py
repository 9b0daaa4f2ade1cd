"""Greedy outputs of the Engine must equal transformers' token for token (float32, CPU)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.entrypoints.engine import Engine

PREFIX = "You are a helpful assistant. Answer briefly and politely, in plain words. "
PROMPTS = [
    "a",
    "Hello there, how are you?",
    PREFIX + "What is the capital of France?",
    PREFIX + "Name three colours.",
    PREFIX + "Count from one to ten, please, and then stop counting.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
    "Über café naïve résumé — 東京 and 北京 😀",
    PREFIX + PREFIX + "Say something long about the sea.",
]
NUM_NEW = 12


@cache
def _hf(model_dir: str) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(model_dir: Path, prompt: str, num_new: int) -> list[int]:
    """Independent reference: transformers' own forward with its KV cache, argmax each step."""
    model, tok = _hf(str(model_dir))
    ids = tok(prompt, return_tensors="pt").input_ids
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(num_new):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def assert_pages_released(engine: Engine) -> None:
    sched = engine.core.scheduler
    cache_pages = sched.cache.num_cached_pages if sched.cache else 0
    assert sched.allocator.num_free + cache_pages == sched.allocator.num_total
    if sched.cache is not None:
        assert sched.cache.num_locked_pages == 0
        sched.cache.check_integrity()
    assert not sched.running and not sched.waiting and not sched.requests


CONFIGS = {
    "chunked_prefix_cache": dict(page_size=4, chunk_size=7, max_batch_tokens=24, num_pages=256),
    "no_prefix_cache": dict(page_size=4, chunk_size=16, enable_prefix_cache=False, num_pages=256),
    "tiny_pool_preempts": dict(page_size=4, chunk_size=64, num_pages=40),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(tiny_models: dict[str, Path], arch: str, config: str) -> None:
    model_dir = tiny_models[arch]
    refs = [hf_greedy(model_dir, p, NUM_NEW) for p in PROMPTS]
    engine = Engine(
        str(model_dir), in_process=True, device="cpu", dtype="float32", **CONFIGS[config]
    )
    params = {"temperature": 0, "max_new_tokens": NUM_NEW, "ignore_eos": True}
    outs = engine.generate(PROMPTS, params)
    for prompt, out, ref in zip(PROMPTS, outs, refs):
        assert out["output_ids"] == ref, f"{arch}/{config}: mismatch for {prompt!r}"
        assert out["meta_info"]["completion_tokens"] == NUM_NEW
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NUM_NEW}
    if config == "tiny_pool_preempts":
        assert engine.core.scheduler.num_preemptions > 0
    if config == "chunked_prefix_cache":
        # A second round hits the cache for the shared prefixes and still matches.
        again = engine.generate(PROMPTS, params)
        assert [o["output_ids"] for o in again] == refs
        assert sum(o["meta_info"]["cached_tokens"] for o in again) > 0
    assert_pages_released(engine)


def test_stop_token_ends_output_at_its_first_occurrence(tiny_llama: Path) -> None:
    engine = Engine(str(tiny_llama), in_process=True, device="cpu", page_size=4, num_pages=128)
    for prompt in PROMPTS[:4]:
        ref = hf_greedy(tiny_llama, prompt, 20)
        stop = ref[6]
        expected = ref[: ref.index(stop) + 1]
        out = engine.generate(
            prompt, {"temperature": 0, "max_new_tokens": 20, "stop_token_ids": [stop]}
        )
        assert out["output_ids"] == expected
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert_pages_released(engine)


def test_stop_string_is_trimmed_from_text(tiny_llama: Path) -> None:
    _, tok = _hf(str(tiny_llama))
    engine = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=128)
    prompt = PROMPTS[1]
    ref = hf_greedy(tiny_llama, prompt, 20)
    full_text = tok.decode(ref, skip_special_tokens=True)
    stop = full_text[10:13]
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 20, "stop": stop})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == full_text[: full_text.index(stop)]
    assert out["output_ids"] == ref[: len(out["output_ids"])]
    assert len(out["output_ids"]) < 20


def test_input_ids_in_output_ids_out(tiny_llama: Path) -> None:
    _, tok = _hf(str(tiny_llama))
    engine = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=64)
    ids = [tok.encode(p) for p in PROMPTS[:3]]
    outs = engine.generate(
        input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    )
    assert [o["output_ids"] for o in outs] == [hf_greedy(tiny_llama, p, 5) for p in PROMPTS[:3]]
