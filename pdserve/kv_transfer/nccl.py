"""KV transfer with torch.distributed point-to-point: NCCL between GPUs (one node or several), and
gloo between CPU pools through the same code (what the CPU tests run).

Each (prefill, decode) pair gets its own two-rank process group (decode rank 0, prefill rank 1),
made lazily through a TCPStore that the decode receiver hosts and names in its handshake. So no
cluster-wide world is needed: workers start in any order, tensor-parallel groups stay separate, and a
lost prefill breaks only its own pair. Per transfer the sender pushes a small header to the
receiver's ZMQ socket, then sends one contiguous staging tensor; the receiver posts the matching recv
when it reads the header, and scatters into the pages when the recv completes.

Tensor parallelism: as over tcp (tcp.py), each rank has its own receiver (socket, store) or
sender, a decode worker's handshake lists every rank's (`ranks`), and each prefill rank sends each
decode rank the heads `head_map.head_routes` gives it over their own pair group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import msgpack
import torch
import torch.distributed as dist
import zmq

from pdserve.kv_transfer.base import (
    HasKVBuffer,
    KVReceiver,
    KVSender,
    KVTransferError,
    dtype_name,
    layout_of,
    staging_shape,
)
from pdserve.kv_transfer.head_map import HeadRoute, rank_handshakes, routes_from
from pdserve.kv_transfer.page_copy import gather_pages
from pdserve.kv_transfer.tcp import bind_pull, connect_push

logger = logging.getLogger(__name__)

DECODE_RANK, PREFILL_RANK = 0, 1
_HEADER_TAG = "pdserve-kv-header-1"


@dataclass
class KVHeader:
    """prefill -> decode on the backend's own socket: describes the tensor that follows."""

    sender_id: str  # names the pair's process group
    seq: int  # per pair; the recv's tag (gloo matches on it; NCCL keeps order by itself)
    rid: str
    dst_pages: list[int]
    dtype: str
    shape: list[int]  # [L, 2, n, page_size, num_heads or Hkv, D]
    head_start: int = 0  # the run of the receiving rank's KV heads the tensor holds
    num_heads: int = 0  # 0: all of them (whole pages)


def encode_header(header: KVHeader) -> bytes:
    return msgpack.packb([_HEADER_TAG, *dataclasses.astuple(header)], use_bin_type=True)


def decode_header(raw: bytes) -> KVHeader:
    values = msgpack.unpackb(raw, raw=False)
    if not isinstance(values, list) or not values or values[0] != _HEADER_TAG:
        raise ValueError("not a KV header")
    return KVHeader(*values[1:])


def open_pair_group(
    store: dist.Store, sender_id: str, rank: int, device: torch.device, timeout_s: float
) -> Any:
    """The two-rank group of one (decode, prefill) pair: NCCL for CUDA pools, gloo for CPU ones.
    gloo's constructor blocks until both ranks are in; NCCL connects on the first send/recv."""
    prefix = dist.PrefixStore(f"pdserve-kv/{sender_id}", store)
    timeout = timedelta(seconds=timeout_s)
    if device.type != "cuda":
        return dist.ProcessGroupGloo(prefix, rank, 2, timeout)
    # NCCL reads these when it builds the pair's communicator. Point-to-point gains nothing from
    # NVLink multicast (NVLS), which also reserves memory; and a peer lost mid-transfer must fail
    # that transfer, not tear this worker down (the default handling kills the process).
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # clean up only
    from torch.distributed import ProcessGroupNCCL

    torch.cuda.set_device(device)
    options = ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return ProcessGroupNCCL(prefix, rank, 2, options)


def _shutdown(group: Any) -> None:
    shutdown = getattr(group, "shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception as e:  # closing must not raise; the process is going away anyway
            logger.debug("KV process group shutdown: %s", e)


# ---------------------------------------------------------------------------- receiver


class _PendingRecv(NamedTuple):
    header: KVHeader
    staging: torch.Tensor  # [L, 2, n, page_size, Hkv, D], the pool's dtype and device
    work: Any  # the recv's c10d Work
    done: threading.Event | None  # gloo: set by a waiter thread (its Work completes in wait())
    errors: list[str]  # gloo: what the waiter thread caught


def _wait_in_thread(work: Any, done: threading.Event, errors: list[str]) -> None:
    try:
        work.wait()
    except Exception as e:  # reported through poll(), never raised in a thread
        errors.append(f"{type(e).__name__}: {e}")
    done.set()


class NcclReceiver(KVReceiver):
    needs_arrival = True
    frees_on_cancel = (
        True  # a late recv still completes (keeping the pair in step), then is dropped
    )

    def __init__(
        self,
        pool: torch.Tensor | HasKVBuffer,
        address: str | None = None,
        host: str = "127.0.0.1",
        store_port: int = 0,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(pool)
        self.timeout_s = timeout_s
        self._sock, self.address = bind_pull(address, host, "kv-header")
        self._store = dist.TCPStore(
            host,
            store_port,
            None,
            True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self._store_host = host
        self._pairs: dict[str, Any] = {}  # sender_id -> its pair's process group
        self._broken: dict[str, str] = {}  # sender_id -> why its pair is out of step
        self._pending: list[_PendingRecv] = []

    def handshake(self) -> dict[str, Any]:
        return {
            "backend": "nccl",
            "address": self.address,
            "store_host": self._store_host,
            "store_port": self._store.port,
            **layout_of(self.buffer),
        }

    def _drain(self) -> None:
        while True:
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                header = decode_header(raw)
            except Exception as e:  # a peer's garbage must not kill the decode worker
                logger.warning("dropping an undecodable KV header: %s", e)
                continue
            self._on_header(header)
        self._collect()

    def _on_header(self, h: KVHeader) -> None:
        if h.sender_id in self._broken:
            self._fail(h.rid, self._broken[h.sender_id])
            return
        error = self._check_header(h)
        if error:  # the tensor behind it cannot be received: the pair is out of step for good
            self._break(h, f"bad KV header: {error}")
            return
        try:
            group = self._pairs.get(h.sender_id)
            if group is None:
                group = open_pair_group(
                    self._store, h.sender_id, DECODE_RANK, self.local.device, self.timeout_s
                )
                self._pairs[h.sender_id] = group
            staging = torch.empty(h.shape, dtype=self.local.dtype, device=self.local.device)
            work = group.recv([staging], PREFILL_RANK, h.seq)
        except Exception as e:
            self._break(h, f"posting the KV recv failed: {type(e).__name__}: {e}")
            return
        done, errors = None, []
        if not self.local.is_cuda:
            done = threading.Event()
            threading.Thread(
                target=_wait_in_thread,
                args=(work, done, errors),
                daemon=True,
                name=f"kv-recv-{h.rid}",
            ).start()
        self._pending.append(_PendingRecv(h, staging, work, done, errors))

    def _check_header(self, h: KVHeader) -> str:
        if h.dtype != dtype_name(self.buffer.dtype):
            return f"dtype {h.dtype!r}, expected {dtype_name(self.buffer.dtype)!r}"
        if not 0 < len(h.dst_pages) <= self.num_pages:
            return f"{len(h.dst_pages)} pages, expected 1..{self.num_pages}"
        num_heads = h.num_heads or self.num_local_heads
        if h.head_start < 0 or num_heads < 0 or h.head_start + num_heads > self.num_local_heads:
            return f"heads from {h.head_start}: {num_heads}, expected within {self.num_local_heads}"
        expected = staging_shape(self.local, len(h.dst_pages))
        expected[4] = num_heads
        if list(h.shape) != expected:
            return f"shape {list(h.shape)}, expected {expected}"
        return ""

    def _collect(self) -> None:
        """Land every recv that has completed; keep the others for the next poll."""
        waiting = []
        for p in self._pending:
            if not (p.done.is_set() if p.done is not None else p.work.is_completed()):
                waiting.append(p)
                continue
            error = p.errors[0] if p.errors else ""
            if p.done is None:
                try:
                    p.work.wait()  # NCCL: orders this stream after the recv; raises if it failed
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
            if error:
                self._break(p.header, f"KV recv failed: {error}")
            else:
                h = p.header
                num_heads = h.num_heads or self.num_local_heads
                self._land_heads(h.rid, list(h.dst_pages), h.head_start, num_heads, p.staging)
        self._pending = waiting

    def _break(self, h: KVHeader, error: str) -> None:
        logger.error("request %s: KV pair with sender %s broken: %s", h.rid, h.sender_id, error)
        self._broken.setdefault(h.sender_id, error)
        self._fail(h.rid, error)

    def close(self) -> None:
        super().close()
        self._sock.close(0)
        for group in self._pairs.values():
            _shutdown(group)
        self._pairs.clear()
        self._pending.clear()


# ---------------------------------------------------------------------------- sender


@dataclass
class _Peer:
    sock: zmq.Socket  # PUSH to the receiver's header socket
    store_host: str
    store_port: int
    group: Any = None  # the pair's process group, made on the first send
    seq: int = 0
    broken: str = ""  # set after a failed send: the pair may be out of step
    stuck: list[torch.Tensor] = field(default_factory=list)  # buffers of failed sends, kept alive


class NcclSender(KVSender):
    backend_name = "nccl"

    def __init__(
        self,
        pool: torch.Tensor | HasKVBuffer,
        peers_info: list[dict[str, Any] | None] | tuple = (),
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(pool, peers_info)
        self.timeout_s = timeout_s  # the pair group's own timeout (NCCL's watchdog)
        self.sender_id = uuid.uuid4().hex
        self.local: torch.Tensor = getattr(pool, "local", self.buffer)  # this rank's heads
        self.tp_rank: int = getattr(pool, "tp_rank", 0)
        self.tp_size: int = getattr(pool, "tp_size", 1)
        # decode_idx -> [(the decode rank's pair, what this rank sends it)]
        self._peers: dict[int, list[tuple[_Peer, HeadRoute]]] = {}

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        ranks = rank_handshakes(handshake)
        routes = routes_from(self.tp_rank, self.tp_size, len(ranks), self.buffer.shape[4])
        for peer, _ in self._peers.pop(decode_idx, []):
            peer.sock.close()
            if peer.group is not None:
                _shutdown(peer.group)
        self._peers[decode_idx] = [
            (
                _Peer(
                    connect_push(ranks[r.decode_rank]["address"]),
                    ranks[r.decode_rank]["store_host"],
                    int(ranks[r.decode_rank]["store_port"]),
                ),
                r,
            )
            for r in routes
        ]

    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        pages = gather_pages(self.local, src_pages)  # [L, 2, n, ps, h, D]: this rank's heads
        num_bytes = 0
        for peer, route in self._peers[decode_idx]:
            staging = pages
            if route.num_heads != pages.shape[4]:
                staging = pages.narrow(4, route.src_offset, route.num_heads).contiguous()
            num_bytes += self._send_to(peer, rid, decode_idx, dst_pages, staging, route, deadline)
        return num_bytes

    def _send_to(
        self,
        peer: _Peer,
        rid: str,
        decode_idx: int,
        dst_pages: list[int],
        staging: torch.Tensor,  # [L, 2, n, ps, route.num_heads, D] contiguous
        route: HeadRoute,
        deadline: float,
    ) -> int:
        if peer.broken:
            raise KVTransferError(
                f"request {rid}: decode {decode_idx} is unreachable since an "
                f"earlier failed transfer: {peer.broken}"
            )
        header = KVHeader(
            self.sender_id,
            peer.seq,
            rid,
            list(dst_pages),
            dtype_name(staging.dtype),
            list(staging.shape),
            route.dst_offset,
            route.num_heads,
        )
        peer.seq += 1
        peer.sock.send(encode_header(header))
        try:
            if peer.group is None:
                peer.group = self._open_group(peer, deadline)
            work = peer.group.send([staging], DECODE_RANK, header.seq)
            work.wait(timedelta(seconds=max(deadline - time.perf_counter(), 1e-3)))
        except Exception as e:
            peer.broken = f"{type(e).__name__}: {e}"
            peer.stuck.append(staging)  # the send may still read it
            raise KVTransferError(
                f"request {rid}: KV send to decode {decode_idx} failed or timed out: {peer.broken}"
            ) from e
        return staging.numel() * staging.element_size()

    def _open_group(self, peer: _Peer, deadline: float) -> Any:
        remaining = max(deadline - time.perf_counter(), 1e-3)
        store = dist.TCPStore(
            peer.store_host, peer.store_port, None, False, timeout=timedelta(seconds=remaining)
        )
        timeout = remaining if not self.local.is_cuda else self.timeout_s
        return open_pair_group(store, self.sender_id, PREFILL_RANK, self.local.device, timeout)

    def close(self) -> None:
        super().close()
        for peers in self._peers.values():
            for peer, _ in peers:
                peer.sock.close()
                if peer.group is not None:
                    _shutdown(peer.group)
        self._peers.clear()
