"""The in-process Engine's result fields against independent references: transformers' own
log-softmax for logprobs, the tokenizer's own decode for every text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.entrypoints.engine import Engine, InProcessEngine

PROMPT = "The lighthouse keeper climbed"
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
TOP_N = 3


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> InProcessEngine:
    # No prefix cache: two runs of one prompt then report the same cached_tokens.
    return Engine(
        str(tiny_llama), in_process=True, device="cpu", num_pages=128, enable_prefix_cache=False
    )


def hf_log_probs(model_dir: Path, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """[num_output, vocab] float32 log-probabilities of each output position, by transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # [seq, vocab]
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(output_ids)], dim=-1)


def test_logprobs_match_transformers_and_carry_token_texts(
    engine: InProcessEngine, tiny_llama: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, top_logprobs_num=TOP_N)
    ids, meta = out["output_ids"], out["meta_info"]
    ref = hf_log_probs(tiny_llama, tok.encode(PROMPT), ids)
    assert [int(row.argmax()) for row in ref] == ids  # greedy: each token is transformers' argmax
    token_lps = meta["output_token_logprobs"]
    assert [e[1] for e in token_lps] == ids
    assert [e[2] for e in token_lps] == [tok.decode([i]) for i in ids]
    assert [e[0] for e in token_lps] == pytest.approx(
        [float(ref[j, i]) for j, i in enumerate(ids)], abs=1e-4
    )
    for j, row in enumerate(meta["output_top_logprobs"]):
        values, top_ids = ref[j].topk(TOP_N)
        assert [e[1] for e in row] == top_ids.tolist()
        assert [e[0] for e in row] == pytest.approx(values.tolist(), abs=1e-4)
        assert [e[2] for e in row] == [tok.decode([i]) for i in top_ids.tolist()]
    assert len(meta["output_top_logprobs"]) == len(ids) == meta["completion_tokens"]
    assert meta["input_token_logprobs"] == []


def test_stream_ends_with_the_whole_result(engine: InProcessEngine) -> None:
    whole = engine.generate(PROMPT, GREEDY, return_logprob=True, top_logprobs_num=TOP_N)
    chunks = list(
        engine.generate(PROMPT, GREEDY, return_logprob=True, top_logprobs_num=TOP_N, stream=True)
    )
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "text must be cumulative"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert without_run_fields(chunks[-1]) == without_run_fields(whole)


def test_no_stop_trim_keeps_the_stop_string(engine: InProcessEngine, tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    full = engine.generate(PROMPT, GREEDY)
    stop = full["text"][4:7]
    kept = engine.generate(PROMPT, {**GREEDY, "stop": stop, "no_stop_trim": True})
    trimmed = engine.generate(PROMPT, {**GREEDY, "stop": stop})
    decoded = tok.decode(kept["output_ids"], skip_special_tokens=True)
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert kept["text"] == decoded[: decoded.index(stop) + len(stop)]
    assert trimmed["text"] == decoded[: decoded.index(stop)]
    assert trimmed["output_ids"] == kept["output_ids"]


def test_a_batch_and_stream_of_several_prompts_is_refused_before_any_work(
    engine: InProcessEngine,
) -> None:
    with pytest.raises(ValueError, match="one prompt"):
        engine.generate([PROMPT, PROMPT], GREEDY, stream=True)
    assert not engine.core.has_work()


def without_run_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The result less what differs between two runs of one request (its id, its latency)."""
    meta = {k: v for k, v in result["meta_info"].items() if k not in ("id", "e2e_latency")}
    return {**result, "meta_info": meta}
