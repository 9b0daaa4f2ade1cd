"""The default Engine starts the server's processes and returns the in-process engine's results."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from pdserve.entrypoints.engine import Engine

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there", "The capital of France is", "1 2 3", "Über café"]
PARAMS = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
LOGPROB_PROMPT = "The lighthouse keeper climbed"
LOGPROBS = {"return_logprob": True, "top_logprobs_num": 3}


def logprob_and_stop_results(engine: Any, stop: str) -> list[dict[str, Any]]:
    """One greedy request with logprobs and top-3 alternatives, then the same cut by `stop`."""
    return [
        engine.generate(LOGPROB_PROMPT, PARAMS, **LOGPROBS),
        engine.generate(LOGPROB_PROMPT, {**PARAMS, "stop": stop}, **LOGPROBS),
    ]


def without_run_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The result less what two engines rightly differ in: the request's id and its latency."""
    meta = {k: v for k, v in result["meta_info"].items() if k not in ("id", "e2e_latency")}
    return {**result, "meta_info": meta}


def approx_floats(value: Any) -> Any:
    """`value` with every float compared to within float32 noise (the two engines run the model
    in different processes)."""
    if isinstance(value, float):
        return pytest.approx(value, abs=1e-5)
    if isinstance(value, dict):
        return {k: approx_floats(v) for k, v in value.items()}
    return [approx_floats(v) for v in value] if isinstance(value, list) else value


def test_process_engine_matches_in_process_engine(tiny_llama: Path) -> None:
    ref = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=256)
    expected = ref.generate(PROMPTS, PARAMS)
    stop = ref.generate(LOGPROB_PROMPT, PARAMS)["text"][4:7]
    expected_lp = logprob_and_stop_results(ref, stop)
    check_in_process_results(tiny_llama, expected_lp, stop)
    with Engine(str(tiny_llama), device="cpu", num_pages=256) as engine:
        got = engine.generate(PROMPTS, PARAMS)
        assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]
        assert [g["text"] for g in got] == [e["text"] for e in expected]
        engine.generate(LOGPROB_PROMPT, PARAMS)  # as ref did: the same prefix-cache history
        got_lp = logprob_and_stop_results(engine, stop)
        assert [without_run_fields(g) for g in got_lp] == approx_floats(
            [without_run_fields(e) for e in expected_lp]
        )
        one = engine.generate(PROMPTS[0], PARAMS)
        assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
        chunks = list(engine.generate(PROMPTS[1], PARAMS, stream=True))
        assert chunks[-1]["text"] == expected[1]["text"]

        async def use_async() -> tuple[dict, list[dict]]:
            res = await engine.async_generate(PROMPTS[2], PARAMS)
            streamed = [
                c async for c in await engine.async_generate(PROMPTS[3], PARAMS, stream=True)
            ]
            return res, streamed

        res, streamed = asyncio.run(use_async())
        assert res["output_ids"] == expected[2]["output_ids"]
        assert streamed[-1]["text"] == expected[3]["text"]
        with pytest.raises(ValueError, match="temperature"):
            engine.generate("x", {"temperature": -1})


def check_in_process_results(model: Path, results: list[dict[str, Any]], stop: str) -> None:
    """The reference results are right by the tokenizer's own decode, so that the comparison
    with the process engine compares against something true."""
    tok = AutoTokenizer.from_pretrained(model)
    whole, cut = results
    for result in results:
        ids, meta = result["output_ids"], result["meta_info"]
        assert [e[1:] for e in meta["output_token_logprobs"]] == [[i, tok.decode([i])] for i in ids]
        assert [[e[2] for e in row] for row in meta["output_top_logprobs"]] == [
            [tok.decode([e[1]]) for e in row] for row in meta["output_top_logprobs"]
        ]
        assert all(len(row) == 3 for row in meta["output_top_logprobs"])
    assert whole["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    decoded = tok.decode(cut["output_ids"], skip_special_tokens=True)
    assert cut["text"] == decoded[: decoded.index(stop)] and len(cut["output_ids"]) < 8
