"""The default Engine starts the server's processes and returns the in-process engine's results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve.entrypoints.engine import Engine

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there", "The capital of France is", "1 2 3", "Über café"]
PARAMS = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_process_engine_matches_in_process_engine(tiny_llama: Path) -> None:
    ref = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=256)
    expected = ref.generate(PROMPTS, PARAMS)
    with Engine(str(tiny_llama), device="cpu", num_pages=256) as engine:
        got = engine.generate(PROMPTS, PARAMS)
        assert [g["output_ids"] for g in got] == [e["output_ids"] for e in expected]
        assert [g["text"] for g in got] == [e["text"] for e in expected]
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
