"""KVSender.send_many (several requests' pages in one call) and the fast page-id checks, on CPU
pools over tcp: each transfer gets its own outcome, and a bad one fails alone."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pdserve.kv_transfer import KVTransferError, Transfer, make_receiver, make_sender
from pdserve.kv_transfer.base import page_array

L, PS, H, D = 2, 4, 2, 8  # layers, page_size, kv heads, head_dim
PAGE_NBYTES = L * 2 * PS * H * D * 4  # float32


def make_pool(seed: int, num_pages: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((L, 2, num_pages, PS, H, D), generator=gen)


def poll_until(receiver, rids: set[str], timeout_s: float = 5.0) -> set[str]:
    arrived: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while not rids <= arrived and time.monotonic() < deadline:
        arrived.update(receiver.poll())
        time.sleep(0.001)
    return arrived


def test_send_many_moves_each_request_and_a_bad_one_fails_alone():
    src, dst = make_pool(1, 24), make_pool(2, 32)
    before = dst.clone()
    receiver = make_receiver("tcp", dst)
    sender = make_sender("tcp", src, [receiver.handshake()])
    good = {"a": ([3, 17, 0], [30, 2, 11]), "b": ([5], [19]), "c": ([23, 22], [1, 4])}
    for rid, (_, dst_pages) in good.items():
        receiver.expect(rid, dst_pages)
    transfers = [
        Transfer("a", 0, *good["a"]),
        Transfer("bad", 0, [1, 2], [7, 7]),  # a dst page twice: refused before anything moves
        Transfer("b", 0, *good["b"]),
        Transfer("lost", 4, [1], [1]),  # no such decode worker
        Transfer("c", 0, *good["c"]),
        Transfer("empty", 0, [], []),
    ]
    outcomes = sender.send_many(transfers, timeout_s=5)
    assert [type(o).__name__ for o in outcomes] == [
        "TransferResult",
        "ValueError",
        "TransferResult",
        "KVTransferError",
        "TransferResult",
        "TransferResult",
    ]
    assert "twice" in str(outcomes[1]) and "no handshake" in str(outcomes[3])
    assert [o.num_bytes for o in outcomes if not isinstance(o, Exception)] == [
        3 * PAGE_NBYTES,
        PAGE_NBYTES,
        2 * PAGE_NBYTES,
        0,
    ]
    assert poll_until(receiver, set(good)) == set(good)
    expected = before.clone()
    for src_pages, dst_pages in good.values():
        expected[:, :, dst_pages] = src[:, :, src_pages]
    assert torch.equal(dst, expected)
    assert sender.stats.num_transfers == 4  # the empty one counts: it is complete
    assert sender.stats.bytes_sent == 6 * PAGE_NBYTES
    assert sender.stats.num_failures == 0  # refused transfers are not failed pushes
    sender.close()
    receiver.close()


def test_send_raises_what_send_many_returns():
    receiver = make_receiver("tcp", make_pool(2, 8))
    sender = make_sender("tcp", make_pool(1, 8), [receiver.handshake()])
    with pytest.raises(ValueError, match="src_pages: page id 9"):
        sender.send("r", 0, [9], [1], timeout_s=5)
    with pytest.raises(KVTransferError, match="timed out"):
        sender.send("r", 0, [1], [2], timeout_s=0)
    assert sender.stats.num_failures == 1 and sender.stats.num_transfers == 0
    sender.close()
    receiver.close()


@pytest.mark.parametrize("n", [1, 5, 64, 65, 700])
def test_page_array_accepts_distinct_ids_in_range(n):
    pages = list(np.random.default_rng(n).permutation(1000)[:n].tolist())
    ids = page_array(pages, 1000, "x")
    assert ids.typecode == "i" and list(ids) == pages


@pytest.mark.parametrize("n", [3, 200])
@pytest.mark.parametrize(
    "bad,match",
    [(-1, "page id -1 is invalid"), (1000, "page id 1000 is invalid"), ("dup", "appears twice")],
)
def test_page_array_refuses_what_check_pages_refuses(n, bad, match):
    pages = list(range(10, 10 + n))
    pages[n // 2] = pages[0] if bad == "dup" else bad
    with pytest.raises(ValueError, match=match):
        page_array(pages, 1000, "x")


@pytest.mark.parametrize("bad", [1.5, "3", None, 2**40])
def test_page_array_refuses_non_integers_and_huge_ids(bad):
    with pytest.raises(ValueError, match="is invalid"):
        page_array([1, bad], 1000, "x")
