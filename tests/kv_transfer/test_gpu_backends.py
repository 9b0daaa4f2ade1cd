"""cuda_ipc and nccl between two processes on real GPUs (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from peer_process import make_pool, run_sender_process

from pdserve.kv_transfer import make_receiver, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SRC_SHAPE = [4, 2, 40, 16, 8, 128]  # [L, 2, num_pages, page_size, Hkv, D]: 2 MiB pages in bf16
DST_SHAPE = [4, 2, 64, 16, 8, 128]
TRANSFERS = [
    ("a", [3, 17, 0, 9, 39], [60, 2, 11, 7, 33]),
    ("b", [5], [19]),
    ("c", list(range(10, 30)), list(range(63, 43, -1))),
]


def _expected(before: torch.Tensor, transfers) -> torch.Tensor:
    src = make_pool(1, SRC_SHAPE, torch.bfloat16, "cpu")
    expected = before.clone()
    for _, src_pages, dst_pages in transfers:
        expected[:, :, dst_pages] = src[:, :, src_pages]
    return expected


def test_cuda_ipc_writes_pages_from_another_process_sharing_the_gpu(tmp_path):
    assert resolve_backend("auto", "cuda:0", "cuda:0") == "cuda_ipc"
    dst = make_pool(2, DST_SHAPE, torch.bfloat16, "cuda:0")
    before = dst.cpu()
    receiver = make_receiver("cuda_ipc", dst)
    assert not receiver.needs_arrival and not receiver.frees_on_cancel
    for rid, _, dst_pages in TRANSFERS:
        receiver.expect(rid, dst_pages)
    arrived, stats = run_sender_process(
        tmp_path,
        receiver,
        backend="cuda_ipc",
        device="cuda:0",
        seed=1,
        shape=SRC_SHAPE,
        dtype=torch.bfloat16,
        transfers=TRANSFERS,
        wait_for=set(),
        timeout_s=120,
    )
    assert arrived == set()  # nothing to report: KVReady is the signal
    assert stats["num_transfers"] == 3
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), _expected(before, TRANSFERS))
    receiver.close()


def test_cuda_ipc_send_many_fills_two_decode_pools_and_a_bad_transfer_fails_alone(tmp_path):
    dsts = [make_pool(seed, DST_SHAPE, torch.bfloat16, "cuda:0") for seed in (2, 3)]
    befores = [d.cpu() for d in dsts]
    receivers = [make_receiver("cuda_ipc", d) for d in dsts]
    batch = [  # (rid, decode_idx, src_pages, dst_pages): one kernel per decode pool, one wait
        ("a", 0, [3, 17, 0], [60, 2, 11]),
        ("b", 1, [5, 6], [19, 1]),
        ("bad", 1, [7], [64]),  # decode 1 has 64 pages: refused, the others still move
        ("c", 0, list(range(10, 30)), list(range(40, 20, -1))),  # no dst page shared with "a"
        ("d", 1, [39], [0]),
    ]
    alone = ("e", 0, [1], [5])  # a batch of one, after the first batch
    _, report = run_sender_process(
        tmp_path,
        receivers[0],
        backend="cuda_ipc",
        device="cuda:0",
        seed=1,
        shape=SRC_SHAPE,
        dtype=torch.bfloat16,
        transfers=[],
        wait_for=set(),
        timeout_s=120,
        more_receivers=(receivers[1],),
        batches=[batch, [alone]],
    )
    page_nbytes = 4 * 2 * 16 * 8 * 128 * 2
    assert report["outcomes"] == [n * page_nbytes for n in (3, 2)] + ["ValueError"] + [
        n * page_nbytes for n in (20, 1, 1)
    ]
    assert report["num_transfers"] == 5
    torch.cuda.synchronize()
    for idx, (dst, before) in enumerate(zip(dsts, befores, strict=True)):
        moves = [(rid, s, d) for rid, i, s, d in [*batch, alone] if i == idx and rid != "bad"]
        assert torch.equal(dst.cpu().view(torch.int16), _expected(before, moves).view(torch.int16))
    for r in receivers:
        r.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_nccl_moves_pages_between_two_gpus_and_drops_a_cancelled_request(tmp_path):
    dst = make_pool(2, DST_SHAPE, torch.bfloat16, "cuda:0")
    before = dst.cpu()
    receiver = make_receiver("nccl", dst)
    for rid, _, dst_pages in TRANSFERS:
        receiver.expect(rid, dst_pages)
    receiver.cancel("b")
    arrived, stats = run_sender_process(
        tmp_path,
        receiver,
        backend="nccl",
        device="cuda:1",
        seed=1,
        shape=SRC_SHAPE,
        dtype=torch.bfloat16,
        transfers=TRANSFERS,
        wait_for={"a", "c"},
        timeout_s=120,
    )
    assert arrived == {"a", "c"}
    assert stats["num_transfers"] == 3
    torch.cuda.synchronize()
    kept = [t for t in TRANSFERS if t[0] != "b"]
    assert torch.equal(dst.cpu(), _expected(before, kept))
    assert receiver.take_failures() == []
    receiver.close()
