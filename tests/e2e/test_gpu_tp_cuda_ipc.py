"""cuda_ipc between tensor-parallel workers of different degrees, on a GPU.

On ONE GPU (`PDSERVE_TP_ONE_GPU=1`: every rank of a tensor-parallel worker on the first visible GPU,
the ranks joined over gloo, whose collectives take CUDA tensors; NCCL refuses two ranks on one GPU):
- the ranks of a prefill and a decode worker as the real ones are (rank 0 drives its followers
  through the per-step broadcast, worker/parallel/kv_direct.py), over random pools: each prefill
  rank opens the decode ranks' pools through CUDA IPC and copies its heads into them; every decode
  rank must end up with exactly its heads of the pages;
- a tp 2 engine (the aid itself: gloo on CUDA tensors), and whole clusters, prefill tp 2 -> decode
  tp 1, tp 1 -> tp 2, tp 2 -> tp 2: greedy outputs equal a tp 1 engine's, so a head landing in the
  wrong place shows as a wrong token.
On two GPUs (NCCL inside each worker): prefill tp 2 on GPUs 0, 1 -> decode tp 1 on GPU 0 (rank 1
copies across GPUs) and -> decode tp 2 on GPUs 0, 1 (rank r copies whole pages into rank r).
A tp 1 prefill cannot feed a tp 2 decode on two GPUs by cuda_ipc: a worker sees only its own
GPUs, and decode rank 1's is not the prefill's (use nccl there).
The CPU version of the copies: tests/kv_transfer/test_cuda_ipc_heads.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import torch

import pdserve.config.topology as topology_module
from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port
from pdserve.kv_transfer import make_receiver, make_sender
from pdserve.kv_transfer.base import Transfer
from pdserve.kv_transfer.head_map import RankKVShare, kv_heads_of
from pdserve.worker.parallel.batch_broadcast import Command, Header, receive_header, send_header
from pdserve.worker.parallel.kv_direct import FollowerKV, TPCudaIpcReceiver, TPCudaIpcSender
from pdserve.worker.parallel.tp_group import init_tp_group

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

L, PS, D, NUM_PAGES = 3, 16, 64, 40
SRC_A, DST_A = [1, 5, 2, 9, 30, 31, 32], [6, 3, 7, 11, 39, 0, 20]
SRC_B, DST_B = [4], [8]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42]]
GREEDY = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
OPTIONS = {"device": "cuda", "dtype": "float32", "num_pages": 256, "page_size": 16}


# ---------------------------------------------------------------- the ranks, on random pools


def _whole(heads: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (L, 2, NUM_PAGES, PS, heads, D)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)  # [L, 2, P, PS, H, D], cpu


def _local(whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    start, count = kv_heads_of(rank, tp, whole.shape[4])
    return whole[:, :, :, :, start : start + count].clone()


def _wait_for(path: Path, timeout_s: float = 120) -> bytes:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} never came")
        time.sleep(0.01)
    return path.read_bytes()


def _publish(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


def _prefill(rank: int, tp_size: int, heads: int, port: int, out: Path) -> None:
    device = torch.device("cuda", 0)
    local = _local(_whole(heads, 1), rank, tp_size).to(device)
    if tp_size == 1:
        sender = make_sender("cuda_ipc", local)
    else:
        tp = init_tp_group(rank, tp_size, f"tcp://127.0.0.1:{port}", "cuda")
        if rank > 0:  # a follower: runs rank 0's KV ops until STOP
            kv = FollowerKV(tp, local, heads, device)
            while (header := receive_header(tp, device)).command != Command.STOP:
                kv.run(header)
            kv.close()
            return
        sender = TPCudaIpcSender(RankKVShare(local, 0, tp_size, heads), tp, device)
    sender.connect(0, msgpack.unpackb(_wait_for(out / "handshake"), raw=False))
    transfers = [Transfer("a", 0, SRC_A, DST_A), Transfer("b", 0, SRC_B, DST_B)]
    outcomes = sender.send_many(transfers, timeout_s=60)
    sender.close()
    if tp_size > 1:
        send_header(tp, Header(Command.STOP), device)
    _publish(out / "sent", msgpack.packb([getattr(o, "num_bytes", repr(o)) for o in outcomes]))


def _decode(rank: int, tp_size: int, heads: int, port: int, out: Path) -> None:
    device = torch.device("cuda", 0)
    whole = _whole(heads, 2)
    local = _local(whole, rank, tp_size).to(device)
    want = whole.clone()
    want[:, :, DST_A + DST_B] = _whole(heads, 1)[:, :, SRC_A + SRC_B]
    if tp_size == 1:
        receiver = make_receiver("cuda_ipc", local)
    else:
        tp = init_tp_group(rank, tp_size, f"tcp://127.0.0.1:{port}", "cuda")
        if rank > 0:  # a follower: opens its receiver when told, checks its pool at STOP
            kv = FollowerKV(tp, local, heads, device)
            while (header := receive_header(tp, device)).command != Command.STOP:
                kv.run(header)
            _publish(out / f"decode{rank}", msgpack.packb(_pool_ok(local, want, rank, tp_size)))
            kv.close()
            return
        receiver = TPCudaIpcReceiver(RankKVShare(local, 0, tp_size, heads), tp, device)
    receiver.expect("a", DST_A)
    receiver.expect("b", DST_B)
    assert receiver.poll() == []  # nothing arrives: the prefill's KVReady is the signal
    _publish(out / "handshake", msgpack.packb(receiver.handshake(), use_bin_type=True))
    _wait_for(out / "sent")  # the prefill's copies are done (each rank waited for its own)
    _publish(out / "decode0", msgpack.packb(_pool_ok(local, want, 0, tp_size)))
    if tp_size > 1:
        send_header(tp, Header(Command.STOP), device)
    receiver.close()


def _pool_ok(local: torch.Tensor, want: torch.Tensor, rank: int, tp_size: int) -> bool:
    torch.cuda.synchronize()
    return torch.equal(local.cpu(), _local(want, rank, tp_size))


def _rank_main(i: int, prefill_tp: int, decode_tp: int, heads: int, ports: list, out: str) -> None:
    torch.cuda.set_device(0)
    if i < prefill_tp:
        _prefill(i, prefill_tp, heads, ports[0], Path(out))
    else:
        _decode(i - prefill_tp, decode_tp, heads, ports[1], Path(out))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "heads"),
    [(2, 1, 2), (1, 2, 2), (2, 2, 2), (2, 4, 2), (4, 2, 2), (1, 4, 4)],
    ids=["p2-d1", "p1-d2", "p2-d2-whole-pages", "p2-d4-replicated", "p4-replicated-d2", "p1-d4"],
)
def test_prefill_ranks_copy_their_heads_into_every_decode_rank_on_one_gpu(
    prefill_tp: int, decode_tp: int, heads: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.multiprocessing as mp

    monkeypatch.setenv("PDSERVE_TP_ONE_GPU", "1")  # the spawned ranks inherit it
    args = (prefill_tp, decode_tp, heads, [_port(), _port()], str(tmp_path))
    mp.start_processes(_rank_main, args=args, nprocs=prefill_tp + decode_tp, start_method="spawn")
    page_bytes = sum(kv_heads_of(d, decode_tp, heads)[1] for d in range(decode_tp)) * L * 2 * PS * D
    sent = msgpack.unpackb((tmp_path / "sent").read_bytes())
    assert sent == [len(SRC_A) * page_bytes * 2, len(SRC_B) * page_bytes * 2]  # bfloat16
    for d in range(decode_tp):
        assert msgpack.unpackb((tmp_path / f"decode{d}").read_bytes()), f"decode rank {d}"


# ---------------------------------------------------------------- whole clusters: greedy outputs


def _want(model: Path) -> list[list[int]]:
    with Engine(str(model), in_process=True, **OPTIONS) as engine:
        results = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    return [r["output_ids"] for r in results]


def _cluster_outputs(model: Path, prefill: dict, decode: dict) -> list[list[int]]:
    topology = Topology.for_model(
        str(model),
        mode="pd",
        device="cuda",
        dtype="float32",
        port=_free_port(),
        kv_transfer="cuda_ipc",
        num_pages=256,
        page_size=16,
        prefill=[prefill],
        decode=[decode],
    )
    with Cluster(topology, log_level="error", start_timeout_s=300).start() as cluster:
        body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
        r = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [out["output_ids"] for out in r.json()]


def test_tp2_engine_on_one_gpu_over_gloo_greedy_equals_tp1(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The testing aid itself: gloo's collectives on CUDA tensors serve the sharded layers."""
    want = _want(tiny_llama)
    monkeypatch.setenv("PDSERVE_TP_ONE_GPU", "1")
    with Engine(str(tiny_llama), in_process=True, tp_size=2, **OPTIONS) as engine:
        results = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [r["output_ids"] for r in results] == want


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [
        ({"gpus": [0, 1], "tp": 2}, {"gpus": [0]}),
        ({"gpus": [0]}, {"gpus": [0, 1], "tp": 2}),
        ({"gpus": [0, 1], "tp": 2}, {"gpus": [0, 1], "tp": 2}),
    ],
    ids=["p-tp2-to-d-tp1", "p-tp1-to-d-tp2", "p-tp2-to-d-tp2"],
)
def test_cuda_ipc_between_tp_degrees_on_one_gpu_greedy_equals_tp1(
    tiny_llama: Path, prefill: dict, decode: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _want(tiny_llama)
    # Every rank on the first GPU each worker sees (GPU 0: the launcher lists [0, 1], and on a
    # one-GPU machine CUDA drops the index past the last GPU); the topology's check that GPU 1
    # exists is told there are two.
    monkeypatch.setenv("PDSERVE_TP_ONE_GPU", "1")
    count = max(2, torch.cuda.device_count())
    monkeypatch.setattr(topology_module, "_visible_gpu_count", lambda: count)
    assert _cluster_outputs(tiny_llama, prefill, decode) == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(
    "decode", [{"gpus": [0]}, {"gpus": [0, 1], "tp": 2}], ids=["d-tp1", "d-tp2"]
)
def test_cuda_ipc_from_a_tp2_prefill_on_two_gpus_greedy_equals_tp1(
    tiny_llama: Path, decode: dict
) -> None:
    assert os.environ.get("PDSERVE_TP_ONE_GPU", "") in ("", "0"), "runs with NCCL inside workers"
    want = _want(tiny_llama)
    assert _cluster_outputs(tiny_llama, {"gpus": [0, 1], "tp": 2}, decode) == want
