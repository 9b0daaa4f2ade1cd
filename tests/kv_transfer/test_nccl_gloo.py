"""The nccl backend's code path on CPU pools (gloo), between two processes."""

from __future__ import annotations

import time

import pytest
import torch
from peer_process import make_pool, run_sender_process

from pdserve.kv_transfer import KVTransferError, make_receiver, make_sender
from pdserve.kv_transfer.nccl import KVHeader, decode_header, encode_header

SRC_SHAPE = [2, 2, 12, 4, 2, 8]  # [L, 2, num_pages, page_size, Hkv, D]
DST_SHAPE = [2, 2, 16, 4, 2, 8]


def test_pages_cross_processes_and_a_cancelled_request_is_dropped(tmp_path):
    dst = make_pool(2, DST_SHAPE, torch.bfloat16, "cpu")
    before = dst.clone()
    receiver = make_receiver("nccl", dst)
    transfers = [
        ("first", [3, 7, 1], [10, 2, 5]),
        ("cancelled", [0, 4], [6, 8]),
        ("last", [11, 9, 2, 6], [0, 15, 3, 12]),
    ]
    for rid, _, dst_pages in transfers:
        receiver.expect(rid, dst_pages)
    receiver.cancel("cancelled")
    start = time.monotonic()
    arrived, stats = run_sender_process(
        tmp_path,
        receiver,
        backend="nccl",
        device="cpu",
        seed=1,
        shape=SRC_SHAPE,
        dtype=torch.bfloat16,
        transfers=transfers,
        wait_for={"first", "last"},
    )
    assert arrived == {"first", "last"}
    assert time.monotonic() - start < 20
    src = make_pool(1, SRC_SHAPE, torch.bfloat16, "cpu")
    expected = before.clone()
    for rid, src_pages, dst_pages in transfers:
        if rid != "cancelled":
            expected[:, :, dst_pages] = src[:, :, src_pages]
    assert torch.equal(dst, expected)  # the cancelled request's pages kept their old bytes
    page_nbytes = 2 * 2 * 4 * 2 * 8 * 2
    assert stats == {"bytes_sent": 9 * page_nbytes, "num_transfers": 3}
    assert receiver.take_failures() == []
    receiver.close()


def test_send_to_a_receiver_that_never_polls_times_out():
    receiver = make_receiver("nccl", make_pool(2, DST_SHAPE, torch.float32, "cpu"))
    sender = make_sender("nccl", make_pool(1, SRC_SHAPE, torch.float32, "cpu"))
    sender.connect(0, receiver.handshake())
    start = time.monotonic()
    with pytest.raises(KVTransferError):
        sender.send("r", 0, [1], [2], timeout_s=1.0)
    assert time.monotonic() - start < 10
    with pytest.raises(KVTransferError, match="earlier failed transfer"):
        sender.send("r2", 0, [1], [2], timeout_s=1.0)  # the pair may be out of step now
    assert sender.stats.num_failures == 2
    sender.close()
    receiver.close()


def test_header_with_wrong_shape_fails_its_request():
    dst = make_pool(2, DST_SHAPE, torch.float32, "cpu")
    before = dst.clone()
    receiver = make_receiver("nccl", dst)
    receiver.expect("r", [1, 2])
    bad = KVHeader("s1", 0, "r", [1, 2], "float32", [2, 2, 2, 8, 2, 8])
    import zmq

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(receiver.handshake()["address"])
    push.send(encode_header(bad))
    deadline = time.monotonic() + 5
    failures = []
    while not failures and time.monotonic() < deadline:
        assert receiver.poll() == []
        failures = receiver.take_failures()
    assert [f.rid for f in failures] == ["r"] and "shape" in failures[0].error
    assert torch.equal(dst, before)
    push.close(0)
    receiver.close()


def test_header_codec_round_trips():
    header = KVHeader("abc", 7, "rid-1", [3, 1], "bfloat16", [2, 2, 2, 4, 2, 8])
    assert decode_header(encode_header(header)) == header
    with pytest.raises(ValueError):
        decode_header(b"\x91\x01")
