"""KV transfer between tensor-parallel workers of different degrees, rank to rank (CPU, gloo; tcp,
and nccl, whose pair groups are gloo on CPU pools):
a prefill worker's ranks and a decode worker's ranks as the real ones are (rank 0 drives its
followers through the per-step broadcast: worker/parallel/kv_direct.py), over KV pools holding
random pages instead of a model's. Each decode rank must end up with exactly its heads of the
pages, having received exactly those bytes on its own socket (none through rank 0); a request
cancelled on rank 0 must land nowhere.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgpack
import pytest
import torch

from pdserve.kv_transfer.base import Transfer
from pdserve.kv_transfer.head_map import RankKVShare, kv_heads_of, routes_from
from pdserve.worker.parallel.batch_broadcast import Command, Header, receive_header, send_header
from pdserve.worker.parallel.kv_direct import (
    FollowerKV,
    TPNcclReceiver,
    TPNcclSender,
    TPTcpReceiver,
    TPTcpSender,
)
from pdserve.worker.parallel.tp_group import init_tp_group

L, PS, D, NUM_PAGES = 2, 4, 8, 12
SRC_A, DST_A = [1, 5, 2, 9], [6, 3, 7, 11]  # request "a": lands
SRC_X, DST_X = [4, 8], [2, 10]  # request "x": cancelled on the decode side before it is sent
CPU = torch.device("cpu")


def _whole(heads: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn((L, 2, NUM_PAGES, PS, heads, D), generator=gen)


def _local(whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    start, count = kv_heads_of(rank, tp, whole.shape[4])
    return whole[:, :, :, :, start : start + count].clone()


def _expected_decode(whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    want = torch.zeros_like(_local(whole, rank, tp))
    want[:, :, DST_A] = _local(whole, rank, tp)[:, :, SRC_A]
    return want


def _rank_main(
    i: int, backend: str, prefill_tp: int, decode_tp: int, heads: int, ports: list, out: Path
) -> None:
    torch.set_num_threads(1)
    is_prefill = i < prefill_tp
    side, rank = ("prefill", i) if is_prefill else ("decode", i - prefill_tp)
    tp_size = prefill_tp if is_prefill else decode_tp
    tp = init_tp_group(rank, tp_size, f"tcp://127.0.0.1:{ports[int(not is_prefill)]}", "cpu")
    whole = _whole(heads)
    local = _local(whole, rank, tp_size)
    if not is_prefill:
        local.zero_()
    report: dict = {}
    if rank > 0:  # a follower: runs rank 0's KV ops until STOP
        kv = FollowerKV(tp, local, heads, CPU)
        while (header := receive_header(tp, CPU)).command != Command.STOP:
            assert header.command == Command.KV, header
            kv.run(header)
        if kv.receiver is not None:
            report["bytes_received"] = kv.receiver.bytes_received
        if kv.sender is not None:
            report["bytes_sent"] = kv.sender.stats.bytes_sent
        kv.close()
    elif is_prefill:
        share = RankKVShare(local, 0, tp_size, heads)
        if backend == "tcp":
            sender = TPTcpSender(share, tp, CPU)
        else:
            sender = TPNcclSender(share, tp, CPU, timeout_s=30)
        path = out / "handshake"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        sender.connect(0, msgpack.unpackb(path.read_bytes(), raw=False))
        transfers = [Transfer("x", 0, SRC_X, DST_X), Transfer("a", 0, SRC_A, DST_A)]
        outcomes = sender.send_many(transfers, timeout_s=30)
        report["sent"] = [getattr(o, "num_bytes", repr(o)) for o in outcomes]
        sender.close()
        send_header(tp, Header(Command.STOP), CPU)
    else:
        share = RankKVShare(local, 0, tp_size, heads)
        receiver_cls = TPTcpReceiver if backend == "tcp" else TPNcclReceiver
        receiver = receiver_cls(share, tp, CPU)
        receiver.expect("x", DST_X)
        receiver.expect("a", DST_A)
        receiver.cancel("x")
        tmp = out / "handshake.tmp"
        tmp.write_bytes(msgpack.packb(receiver.handshake()))
        tmp.rename(out / "handshake")
        arrived: list[str] = []
        deadline = time.monotonic() + 60
        while not arrived and time.monotonic() < deadline:
            arrived += receiver.poll()
            time.sleep(0.005)
        report["arrived"] = arrived
        report["failures"] = [f.error for f in receiver.take_failures()]
        report["bytes_received"] = receiver.bytes_received
        report["rank_addresses"] = [h["address"] for h in receiver.handshake()["ranks"]]
        receiver.close()
        send_header(tp, Header(Command.STOP), CPU)
    if not is_prefill:
        report["pool_ok"] = torch.equal(local, _expected_decode(whole, rank, tp_size))
    (out / f"{side}{rank}").write_bytes(msgpack.packb(report))
    tp.comm.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("backend", "prefill_tp", "decode_tp", "heads"),
    [("tcp", 2, 4, 2), ("tcp", 4, 2, 2), ("nccl", 2, 4, 2)],
    ids=[
        "tcp-p-tp2-to-d-tp4-replicated",
        "tcp-p-tp4-replicated-to-d-tp2",
        "nccl-gloo-p-tp2-to-d-tp4",
    ],
)
def test_kv_goes_rank_to_rank_between_tp_degrees(
    backend: str, prefill_tp: int, decode_tp: int, heads: int, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ports = [_free_port(), _free_port()]
    # fork: the ranks start at once (no re-import of torch in each, as spawn does)
    mp.start_processes(
        _rank_main,
        start_method="fork",
        args=(backend, prefill_tp, decode_tp, heads, ports, tmp_path),
        nprocs=prefill_tp + decode_tp,
    )
    reports = {p.name: msgpack.unpackb(p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()}
    decode0 = reports["decode0"]
    assert decode0["arrived"] == ["a"] and decode0["failures"] == []
    assert len(set(decode0["rank_addresses"])) == decode_tp  # a socket per rank
    page_head_bytes = L * 2 * PS * D * 4  # one head of one page, float32
    for d in range(decode_tp):
        report = reports[f"decode{d}"]
        assert report["pool_ok"], f"decode rank {d}: wrong pages (or x's landed)"
        # exactly its own heads of a's pages came to this rank's socket: rank 0 relayed nothing
        num_heads = kv_heads_of(d, decode_tp, heads)[1]
        assert report["bytes_received"] == len(SRC_A) * num_heads * page_head_bytes
    # the prefill's rank 0 reports, per request, what every rank sent
    total_heads = sum(kv_heads_of(d, decode_tp, heads)[1] for d in range(decode_tp))
    assert reports["prefill0"]["sent"] == [
        len(SRC_X) * total_heads * page_head_bytes,
        len(SRC_A) * total_heads * page_head_bytes,
    ]
    # each prefill follower sent its routes' heads from its own sender
    for p in range(1, prefill_tp):
        num_heads = sum(r.num_heads for r in routes_from(p, prefill_tp, decode_tp, heads))
        want = (len(SRC_X) + len(SRC_A)) * num_heads * page_head_bytes
        assert reports[f"prefill{p}"]["bytes_sent"] == want, f"prefill rank {p}"
