"""The tcp backend between two real pools in one process (two sockets, the real codec)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from pdserve import protocol
from pdserve.config.engine_config import ModelConfig
from pdserve.config.topology_sections import FaultInjectionConfig
from pdserve.fault_injection import FaultInjector
from pdserve.kv_transfer import KVTransferError, make_receiver, make_sender
from pdserve.kv_transfer.tcp import TcpSender
from pdserve.worker.kv_pool import KVPool

L, PS, H, D = 2, 4, 2, 8  # layers, page_size, kv heads, head_dim
PAGE_NBYTES = L * 2 * PS * H * D * 2  # bfloat16


def make_pool(seed: int, num_pages: int, page_size: int = PS, dtype=torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((L, 2, num_pages, page_size, H, D), generator=gen).to(dtype)


def poll_until(receiver, rids: set[str], timeout_s: float = 5.0) -> set[str]:
    arrived: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while not rids <= arrived and time.monotonic() < deadline:
        arrived.update(receiver.poll())
        time.sleep(0.001)
    return arrived


def poll_for(receiver, seconds: float = 0.2) -> set[str]:
    """Poll for a while (to let anything in flight land) and return what arrived."""
    arrived: set[str] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        arrived.update(receiver.poll())
        time.sleep(0.002)
    return arrived


def assert_moved(
    src: torch.Tensor,
    dst: torch.Tensor,
    before: torch.Tensor,
    moves: list[tuple[list[int], list[int]]],
) -> None:
    """dst's pages named in moves equal src's; every other dst page equals `before`."""
    expected = before.clone()
    for src_pages, dst_pages in moves:
        expected[:, :, dst_pages] = src[:, :, src_pages]
    assert torch.equal(dst, expected)


@pytest.fixture
def pair():
    src, dst = make_pool(1, 24), make_pool(2, 32)
    receiver = make_receiver("tcp", dst)
    sender = make_sender("tcp", src, [receiver.handshake()])
    yield src, dst, receiver, sender
    sender.close()
    receiver.close()


def test_interleaved_requests_land_in_their_pages_and_nothing_else_changes(pair):
    src, dst, receiver, sender = pair
    before = dst.clone()
    moves = {
        "a": ([3, 17, 0, 9], [30, 2, 11, 7]),
        "b": ([5], [19]),
        "c": ([23, 22, 1, 12, 6], [1, 4, 28, 15, 24]),
    }
    for rid, (_, dst_pages) in moves.items():
        receiver.expect(rid, dst_pages)
    for rid in ("b", "a", "c"):  # not in expect order
        src_pages, dst_pages = moves[rid]
        result = sender.send(rid, 0, src_pages, dst_pages, timeout_s=5)
        assert result.num_bytes == len(src_pages) * PAGE_NBYTES
    assert poll_until(receiver, set(moves)) == set(moves)
    assert_moved(src, dst, before, list(moves.values()))
    assert sender.stats.num_transfers == 3
    assert sender.stats.bytes_sent == 10 * PAGE_NBYTES
    assert receiver.take_failures() == []


def test_kv_pool_objects_are_accepted():
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "num_attention_heads": 4,
        "hidden_size": 32,
        "num_key_value_heads": H,
        "vocab_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": L,
    }
    model = ModelConfig.from_hf_dict(hf)
    src_pool = KVPool(model, num_pages=8, page_size=PS, dtype=torch.float32, device="cpu")
    dst_pool = KVPool(model, num_pages=8, page_size=PS, dtype=torch.float32, device="cpu")
    src_pool.buffer.copy_(torch.randn_like(src_pool.buffer))
    receiver = make_receiver("tcp", dst_pool)
    sender = make_sender("tcp", src_pool)
    sender.connect(0, receiver.handshake())
    receiver.expect("r", [6, 1])
    sender.send("r", 0, [2, 5], [6, 1], timeout_s=5)
    assert poll_until(receiver, {"r"}) == {"r"}
    assert torch.equal(dst_pool.buffer[:, :, [6, 1]], src_pool.buffer[:, :, [2, 5]])
    sender.close()
    receiver.close()


def _capture(handshake: dict) -> tuple[zmq.Socket, dict]:
    """A raw PULL socket standing in for the receiver, and a handshake that points at it."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, {**handshake, "address": f"tcp://127.0.0.1:{port}"}


def _recv_frames(sock: zmq.Socket, count: int, timeout_ms: int = 5000) -> list[bytes]:
    """Exactly `count` frames (fails, never hangs, when fewer come), and none after them."""
    frames = []
    for _ in range(count):
        assert sock.poll(timeout_ms), f"got {len(frames)} KV chunks, expected {count}"
        frames.append(sock.recv())
    assert sock.poll(100) == 0, f"more than {count} KV chunks"
    return frames


def _forward(frames: list[bytes], address: str) -> None:
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(address)
    for frame in frames:
        push.send(frame)
    push.close(linger=2000)


def test_large_transfer_is_split_into_whole_page_chunks_and_completes_only_when_all_land():
    src, dst = make_pool(3, 16), make_pool(4, 16)
    before = dst.clone()
    receiver = make_receiver("tcp", dst)
    capture, handshake = _capture(receiver.handshake())
    sender = TcpSender(src, [handshake], chunk_bytes=2 * PAGE_NBYTES + 1)
    src_pages, dst_pages = [15, 0, 7, 3, 9], [2, 14, 5, 8, 11]
    receiver.expect("big", dst_pages)
    sender.send("big", 0, src_pages, dst_pages, timeout_s=5)
    frames = _recv_frames(capture, 3)
    chunks = [protocol.decode(f) for f in frames]
    assert [c.dst_pages for c in chunks] == [[2, 14], [5, 8], [11]]
    assert [c.is_last for c in chunks] == [False, False, True]
    assert all(len(c.data) == len(c.dst_pages) * PAGE_NBYTES for c in chunks)

    _forward(frames[:2], receiver.address)
    assert poll_for(receiver) == set()  # 4 of 5 pages: not complete yet
    _forward(frames[2:], receiver.address)
    assert poll_until(receiver, {"big"}) == {"big"}
    assert_moved(src, dst, before, [(src_pages, dst_pages)])
    capture.close(0)
    sender.close()
    receiver.close()


def test_cancel_between_chunks_drops_the_rest():
    src, dst = make_pool(5, 8), make_pool(6, 8)
    before = dst.clone()
    receiver = make_receiver("tcp", dst)
    capture, handshake = _capture(receiver.handshake())
    sender = TcpSender(src, [handshake], chunk_bytes=PAGE_NBYTES)
    receiver.expect("r", [4, 6, 1])
    sender.send("r", 0, [0, 1, 2], [4, 6, 1], timeout_s=5)
    frames = _recv_frames(capture, 3)
    _forward(frames[:1], receiver.address)
    assert poll_for(receiver) == set()
    receiver.cancel("r")
    _forward(frames[1:], receiver.address)
    assert poll_for(receiver) == set()
    assert_moved(src, dst, before, [([0], [4])])  # pages 6 and 1 never written
    capture.close(0)
    sender.close()
    receiver.close()


def test_cancel_before_data_arrives_drops_it_and_later_requests_still_land(pair):
    src, dst, receiver, sender = pair
    before = dst.clone()
    receiver.expect("gone", [5, 6, 7])
    receiver.expect("kept", [8, 9])
    receiver.cancel("gone")
    sender.send("gone", 0, [1, 2, 3], [5, 6, 7], timeout_s=5)
    sender.send("kept", 0, [4, 0], [8, 9], timeout_s=5)
    # One socket keeps order: once "kept" landed, "gone"'s bytes were read and dropped.
    assert poll_until(receiver, {"kept"}) == {"kept"}
    assert_moved(src, dst, before, [([4, 0], [8, 9])])
    assert receiver.take_failures() == []


def test_reregistered_rid_ignores_stale_chunks_for_its_old_pages(pair):
    src, dst, receiver, sender = pair
    before = dst.clone()
    receiver.expect("r", [1, 2])
    receiver.cancel("r")
    receiver.expect("r", [3, 4])  # the same rid, new pages
    sender.send("r", 0, [10, 11], [1, 2], timeout_s=5)  # stale: the old pages
    sender.send("r", 0, [12, 13], [3, 4], timeout_s=5)
    assert poll_until(receiver, {"r"}) == {"r"}
    assert_moved(src, dst, before, [([12, 13], [3, 4])])


def test_layout_mismatch_is_refused_at_connect():
    receiver = make_receiver("tcp", make_pool(7, 8, page_size=8))
    sender = make_sender("tcp", make_pool(8, 8))
    with pytest.raises(ValueError, match="page_shape"):
        sender.connect(0, receiver.handshake())
    other_dtype = make_sender("tcp", make_pool(8, 8, page_size=8, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        other_dtype.connect(0, receiver.handshake())
    with pytest.raises(ValueError, match="backend"):
        sender.connect(0, {**receiver.handshake(), "backend": "nccl"})
    receiver.close()


def test_chunk_with_wrong_shape_fails_the_request_and_writes_nothing():
    dst = make_pool(9, 8)
    before = dst.clone()
    receiver = make_receiver("tcp", dst)
    receiver.expect("r", [2, 3])
    wrong = make_pool(10, 2, page_size=8)  # pages twice as large
    chunk = protocol.KVChunk(
        rid="r",
        dst_pages=[2, 3],
        dtype="bfloat16",
        shape=list(wrong.shape),
        data=wrong.view(torch.uint8).numpy().tobytes(),
    )
    _forward([protocol.encode(chunk)], receiver.address)
    deadline = time.monotonic() + 5
    failures = []
    while not failures and time.monotonic() < deadline:
        assert receiver.poll() == []
        failures = receiver.take_failures()
    assert [f.rid for f in failures] == ["r"] and "shape" in failures[0].error
    assert torch.equal(dst, before)
    assert not receiver.is_expecting("r")
    receiver.close()


def test_bad_page_ids_are_refused_before_anything_moves(pair):
    src, dst, receiver, sender = pair
    with pytest.raises(ValueError, match="dst_pages"):
        sender.send("r", 0, [1], [32], timeout_s=5)  # decode has 32 pages
    with pytest.raises(ValueError, match="twice"):
        sender.send("r", 0, [1, 2], [3, 3], timeout_s=5)
    with pytest.raises(ValueError, match="src pages"):
        sender.send("r", 0, [1, 2], [3], timeout_s=5)
    with pytest.raises(ValueError, match="src_pages"):
        sender.send("r", 0, [-1], [3], timeout_s=5)
    with pytest.raises(ValueError, match="dst_pages"):
        receiver.expect("r", [0, 40])
    with pytest.raises(KVTransferError, match="no handshake"):
        sender.send("r", 3, [1], [1], timeout_s=5)
    assert sender.stats.num_transfers == 0


def test_timed_out_send_raises_and_counts_a_failure(pair):
    src, dst, receiver, sender = pair
    with pytest.raises(KVTransferError, match="timed out"):
        sender.send("r", 0, [1, 2], [3, 4], timeout_s=0)
    assert sender.stats.num_failures == 1 and sender.stats.num_transfers == 0


def test_empty_transfer_is_complete_at_once(pair):
    src, dst, receiver, sender = pair
    receiver.expect("empty", [])
    assert sender.send("empty", 0, [], [], timeout_s=5).num_bytes == 0
    assert receiver.poll() == ["empty"]


def test_duplicate_expect_is_refused(pair):
    _, _, receiver, _ = pair
    receiver.expect("r", [1])
    with pytest.raises(ValueError, match="already"):
        receiver.expect("r", [2])


# ---------------------------------------------------------------- hostile frames, injected faults


def test_garbage_on_the_kv_socket_is_dropped_and_counted_and_transfers_still_land(pair):
    src, dst, receiver, sender = pair
    before = dst.clone()
    receiver.expect("r", [3, 4])
    wrong_types = protocol.KVChunk(rid="r", dst_pages=["3"], dtype=1, shape=[], data="x")
    garbage = [
        b"\x01\x02",
        b"",
        protocol.encode(protocol.Shutdown()),  # a valid message, but not a KVChunk
        protocol.encode(wrong_types),
    ]
    _forward(garbage, receiver.address)
    sender.send("r", 0, [10, 11], [3, 4], timeout_s=5)
    assert poll_until(receiver, {"r"}) == {"r"}
    assert receiver.num_dropped == len(garbage)
    assert receiver.take_failures() == []
    assert_moved(src, dst, before, [([10, 11], [3, 4])])


def test_injected_kv_failures_hit_about_their_share_and_raise_transfer_errors(pair):
    src, dst, receiver, sender = pair
    sender.faults = FaultInjector(FaultInjectionConfig(kv_failure_prob=0.1, seed=3), "prefill0")
    num_failed = 0
    for i in range(200):
        try:
            sender.send(f"r{i}", 0, [i % 24], [i % 32], timeout_s=5)
        except KVTransferError as e:
            assert "injected KV transfer failure" in str(e)
            num_failed += 1
    assert 8 <= num_failed <= 35
    assert num_failed == sender.faults.num_kv_failures == sender.stats.num_failures
    assert sender.stats.num_transfers == 200 - num_failed


def test_an_injected_delay_counts_against_the_transfer_timeout(pair):
    src, dst, receiver, sender = pair
    sender.faults = FaultInjector(FaultInjectionConfig(kv_delay_s=0.2, seed=0))
    with pytest.raises(KVTransferError, match="timed out"):
        sender.send("r", 0, [1], [2], timeout_s=0.001)
    assert sender.stats.num_failures == 1
