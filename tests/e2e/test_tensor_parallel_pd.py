"""Prefill and decode workers of different tensor-parallel degrees (CPU, gloo, KV over tcp, rank
to rank: worker/parallel/kv_direct.py): each rank of a tp 2 prefill worker sends its KV head to the
one rank of a tp 1 decode worker; a tp 1 prefill worker sends each rank of a tp 2 decode worker its
head. Greedy outputs equal a tp 1 engine's, so a page or head landing in the wrong place shows as
a wrong token. Replicated KV heads (tp 2 -> tp 4, tp 4 -> tp 2) and the bytes each rank moves are
test_tensor_parallel_kv's, on the same rank processes without the serving cluster around them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200, 300, 11, 12], [42, 43]]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def want(tiny_models: dict[str, Path]) -> list[list[int]]:
    with Engine(str(tiny_models["qwen2"]), in_process=True, device="cpu") as engine:
        return [r["output_ids"] for r in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture(
    scope="module",
    params=[(2, 1), (1, 2)],
    ids=["p-tp2-to-d-tp1", "p-tp1-to-d-tp2"],
)
def cluster(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Iterator[Cluster]:
    prefill_tp, decode_tp = request.param
    topology = Topology.for_model(
        str(tiny_models["qwen2"]),  # q/k/v biases: each rank must take its rows of them too
        mode="pd",
        device="cpu",
        port=_free_port(),
        num_pages=256,
        page_size=4,
        kv_transfer="tcp",
        prefill=[{"tp": prefill_tp}],
        decode=[{"tp": decode_tp}],
    )
    cluster = Cluster(topology, log_level="error", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=5)


def test_greedy_outputs_across_tp_degrees_equal_tp1(
    cluster: Cluster, want: list[list[int]]
) -> None:
    body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
    r = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert [out["output_ids"] for out in r.json()] == want
