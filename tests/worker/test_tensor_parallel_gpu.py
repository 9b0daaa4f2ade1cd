"""Tensor parallelism on two GPUs with NCCL: an in-process tp 2 engine's greedy outputs equal tp 1's,
a tp 2 prefill worker feeds a tp 1 decode worker and a tp 1 prefill worker a tp 2 decode worker
(KV over tcp, rank to rank: each rank stages its own heads through its own host socket); and
over nccl, rank to rank (a pair group per prefill rank and decode rank): prefill and decode may
not share a GPU then, so those need 3 and 4 GPUs.
Needs 2 CUDA GPUs (or more, as marked); skipped otherwise (not yet run: no multi-GPU machine so far).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
    ),
]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42]]
GREEDY = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
OPTIONS = {"device": "cuda", "dtype": "float32", "num_pages": 256, "page_size": 16}


def _outputs(engine: object) -> list[list[int]]:
    return [r["output_ids"] for r in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_nccl_tp2_engine_greedy_equals_tp1(tiny_llama: Path) -> None:
    with Engine(str(tiny_llama), in_process=True, **OPTIONS) as engine:
        want = _outputs(engine)
    with Engine(str(tiny_llama), in_process=True, tp_size=2, **OPTIONS) as engine:
        assert _outputs(engine) == want


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [({"gpus": [0, 1], "tp": 2}, {"gpus": [0]}), ({"gpus": [0]}, {"gpus": [0, 1], "tp": 2})],
    ids=["p-tp2-to-d-tp1", "p-tp1-to-d-tp2"],
)
def test_nccl_prefill_and_decode_tp_differ_greedy_equals_tp1(
    tiny_llama: Path, prefill: dict, decode: dict
) -> None:
    with Engine(str(tiny_llama), in_process=True, **OPTIONS) as engine:
        want = _outputs(engine)
    topology = Topology.for_model(
        str(tiny_llama),
        mode="pd",
        device="cuda",
        dtype="float32",
        port=_free_port(),
        kv_transfer="tcp",
        prefill=[prefill],
        decode=[decode],
    )
    with Cluster(topology, log_level="error", start_timeout_s=300).start() as cluster:
        body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
        r = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [out["output_ids"] for out in r.json()] == want


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [
        ({"gpus": [0, 1], "tp": 2}, {"gpus": [2]}),
        ({"gpus": [0, 1], "tp": 2}, {"gpus": [2, 3], "tp": 2}),
        ({"gpus": [0]}, {"gpus": [1, 2], "tp": 2}),
    ],
    ids=["p-tp2-to-d-tp1", "p-tp2-to-d-tp2", "p-tp1-to-d-tp2"],
)
def test_nccl_kv_rank_to_rank_between_tp_degrees_greedy_equals_tp1(
    tiny_llama: Path, prefill: dict, decode: dict
) -> None:
    num_gpus = len(prefill["gpus"]) + len(decode["gpus"])
    if torch.cuda.device_count() < num_gpus:
        pytest.skip(f"needs {num_gpus} GPUs")
    with Engine(str(tiny_llama), in_process=True, **OPTIONS) as engine:
        want = _outputs(engine)
    topology = Topology.for_model(
        str(tiny_llama),
        mode="pd",
        device="cuda",
        dtype="float32",
        port=_free_port(),
        kv_transfer="nccl",
        prefill=[prefill],
        decode=[decode],
    )
    with Cluster(topology, log_level="error", start_timeout_s=300).start() as cluster:
        body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
        r = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [out["output_ids"] for out in r.json()] == want
