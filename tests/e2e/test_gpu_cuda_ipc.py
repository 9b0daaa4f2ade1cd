"""On a GPU: prefill and decode share one GPU and move KV over CUDA IPC; outputs equal a mixed
worker's and the in-process engine's, and every page is free afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["Hello there, how are you?", "The quick brown fox", "Über café 東京 😀", "a b c d e"]
MAX_TOKENS = 16


def _cluster(model: Path, mode: str) -> Cluster:
    topology = Topology.for_model(
        str(model),
        mode=mode,
        device="cuda",
        dtype="float32",
        port=_free_port(),
        kv_transfer="cuda_ipc" if mode == "pd" else None,
        mem_fraction=0.2,
        page_size=16,
    )
    return Cluster(topology, log_level="warning", start_timeout_s=300).start()


def _completions(cluster: Cluster) -> list[str]:
    c = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
    out = []
    for p in PROMPTS:
        res = c.completions.create(
            model="llama",
            prompt=p,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        out.append(res.choices[0].text)
        stream = c.completions.create(
            model="llama",
            prompt=p,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == out[-1]
    return out


def _concurrent_streams(cluster: Cluster, num: int) -> list[int]:
    async def one(c: openai.AsyncOpenAI, i: int) -> int:
        stream = await c.completions.create(
            model="llama",
            prompt=f"request {i}",
            max_tokens=12,
            stream=True,
            temperature=0.7,
            seed=i,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run() -> list[int]:
        c = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(num)))

    return asyncio.run(run())


def _pages_free(cluster: Cluster) -> bool:
    workers = httpx.get(f"{cluster.url}/server_info", timeout=5).json()["workers"]
    return all(
        w["num_running_reqs"] == 0 and w["num_free_pages"] == w["num_total_pages"] for w in workers
    )


def test_pd_over_cuda_ipc_on_one_gpu_matches_mixed_and_engine(tiny_llama: Path) -> None:
    engine = Engine(str(tiny_llama), in_process=True, device="cuda", dtype="float32", num_pages=256)
    params = {"temperature": 0, "max_new_tokens": MAX_TOKENS, "ignore_eos": True}
    expected = [o["text"] for o in engine.generate(PROMPTS, params)]
    del engine
    torch.cuda.empty_cache()
    with _cluster(tiny_llama, "pd") as pd:
        assert _completions(pd) == expected
        assert _concurrent_streams(pd, 64) == [12] * 64
        deadline = time.monotonic() + 5
        while not _pages_free(pd):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = httpx.get(f"{pd.url}/server_info", timeout=5).json()
        assert info["topology"]["kv_transfer"]["backend"] == "cuda_ipc"
    with _cluster(tiny_llama, "mixed") as mixed:
        assert _completions(mixed) == expected
