"""KV transfer staged through host memory over ZeroMQ: works anywhere (CPU, GPU, across nodes).

The sender gathers pages, copies them to the host and pushes `KVChunk` messages (whole pages, at most
`CHUNK_BYTES` each) to the receiver's own PULL socket; the receiver checks and scatters them in poll().
Across nodes the socket is CURVE authenticated like every internal tcp socket (`ipc.py`); a frame
that is not a valid chunk is dropped and counted (`num_dropped`), never raised into the worker loop.

Tensor parallelism: each rank of a worker has its own sender or receiver over its own share of
the pool (`head_map.RankKVShare`); a decode worker's handshake lists every rank's socket
(`ranks`: each rank's handshake), and each prefill rank sends each decode rank the heads `head_map.head_routes`
gives it, straight to that rank's socket (a chunk names its run of heads). Rank 0 coordinates the
ranks (worker/parallel/kv_direct.py); no page passes through another rank.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
import zmq

from pdserve import protocol
from pdserve.ipc import DroppedFrames, decode_or_drop, new_ipc_address, pull_socket, push_socket
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

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # one KVChunk carries at most this much (or one page, if a page is larger)
_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


def bind_pull(address: str | None, host: str, name: str) -> tuple[zmq.Socket, str]:
    """A PULL socket bound to `address` (a fresh ipc:// one if None) and the address peers use.

    tcp://0.0.0.0:* style addresses bind every interface (and a free port); peers get `host`."""
    sock = pull_socket(zmq.Context.instance(), address or new_ipc_address(name))
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    if endpoint.startswith("tcp://"):
        bound_host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if bound_host in _WILDCARD_HOSTS:
            endpoint = f"tcp://{host}:{port}"
    return sock, endpoint


def connect_push(address: str) -> zmq.Socket:
    # Never blocks (memory is bounded by the decode's admission); queued KV gets 5 s to leave.
    return push_socket(zmq.Context.instance(), address, linger_ms=5000)


def bytes_view(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor seen as uint8 (works for bfloat16, which numpy lacks)."""
    return tensor.contiguous().view(torch.uint8).reshape(-1)


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only buffer: we only read it (scatter copies)
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


class TcpReceiver(KVReceiver):
    needs_arrival = True
    frees_on_cancel = True

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, address: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(pool)
        self._sock, self.address = bind_pull(address, host, "kv")
        self.dropped = DroppedFrames(f"KV socket {self.address}")

    def handshake(self) -> dict[str, Any]:
        return {"backend": "tcp", "address": self.address, **layout_of(self.buffer)}

    @property
    def num_dropped(self) -> int:
        """Frames refused on the KV socket: undecodable, not a KVChunk, or unusable."""
        return self.dropped.num_dropped

    def _drain(self) -> None:
        while True:
            try:
                raw = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode_or_drop(raw, self.dropped)
            if msg is None:
                continue
            if not isinstance(msg, protocol.KVChunk):
                self.dropped.drop(f"a {type(msg).__name__} is not a KVChunk")
                continue
            try:
                self._on_chunk(msg)
            except Exception as e:  # a peer's bytes must never kill the decode worker
                self.dropped.drop(f"request {msg.rid}: {type(e).__name__}: {e}")
                self._fail(msg.rid, f"KV chunk unusable: {type(e).__name__}: {e}")

    def _on_chunk(self, msg: protocol.KVChunk) -> None:
        error = self._check_chunk(msg)
        if error:
            self.dropped.drop(f"request {msg.rid}: {error}")
            self._fail(msg.rid, f"KV chunk refused: {error}")
            return
        if not self.is_expecting(msg.rid):
            logger.info(
                "request %s: dropping a late KV chunk of %d pages", msg.rid, len(msg.dst_pages)
            )
            return
        data = tensor_from_bytes(msg.data, self.buffer.dtype, list(msg.shape))
        num_heads = msg.num_heads or self.num_local_heads
        self._land_heads(msg.rid, list(msg.dst_pages), msg.head_start, num_heads, data)

    def _check_chunk(self, msg: protocol.KVChunk) -> str:
        """'' when msg matches this pool's page layout, else what is wrong."""
        if msg.dtype != dtype_name(self.buffer.dtype):
            return f"dtype {msg.dtype!r}, expected {dtype_name(self.buffer.dtype)!r}"
        num_heads = msg.num_heads or self.num_local_heads
        if msg.head_start < 0 or num_heads < 0 or msg.head_start + num_heads > self.num_local_heads:
            return (
                f"heads {msg.head_start}..{msg.head_start + num_heads - 1}, expected within "
                f"0..{self.num_local_heads - 1}"
            )
        expected = staging_shape(self.local, len(msg.dst_pages))
        expected[4] = num_heads
        if list(msg.shape) != expected:
            return f"shape {list(msg.shape)}, expected {expected}"
        page_nbytes = self.local[:, :, 0, :, :num_heads].numel() * self.local.element_size()
        if len(msg.data) != len(msg.dst_pages) * page_nbytes:
            return f"{len(msg.data)} bytes, expected {len(msg.dst_pages) * page_nbytes}"
        return ""

    def close(self) -> None:
        super().close()
        self._sock.close(0)


class TcpSender(KVSender):
    backend_name = "tcp"

    def __init__(
        self,
        pool: torch.Tensor | HasKVBuffer,
        peers_info: list[dict[str, Any] | None] | tuple = (),
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        super().__init__(pool, peers_info)
        self.chunk_bytes = chunk_bytes
        self.local: torch.Tensor = getattr(pool, "local", self.buffer)  # this rank's heads
        self.tp_rank: int = getattr(pool, "tp_rank", 0)
        self.tp_size: int = getattr(pool, "tp_size", 1)
        # decode_idx -> [(the decode rank's socket, what this rank sends it)]
        self._socks: dict[int, list[tuple[zmq.Socket, HeadRoute]]] = {}

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        """Connect to each rank of the decode worker that this rank sends heads to (a decode
        worker of tp 1 lists no `ranks`: its one socket)."""
        addresses = [rank["address"] for rank in rank_handshakes(handshake)]
        num_kv_heads = self.buffer.shape[4]  # the whole pool's, as the handshake's layout
        routes = routes_from(self.tp_rank, self.tp_size, len(addresses), num_kv_heads)
        for sock, _ in self._socks.pop(decode_idx, []):
            sock.close()
        self._socks[decode_idx] = [(connect_push(addresses[r.decode_rank]), r) for r in routes]

    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        page_nbytes = self.buffer[:, :, 0].numel() * self.buffer.element_size()
        per_chunk = max(1, self.chunk_bytes // page_nbytes)
        num_bytes = 0
        for start in range(0, len(src_pages), per_chunk):
            if time.perf_counter() > deadline:
                raise KVTransferError(
                    f"request {rid}: KV transfer timed out after {start} of {len(src_pages)} pages"
                )
            src = src_pages[start : start + per_chunk]
            host = gather_pages(self.local, src).cpu()  # [L, 2, n, ps, h, D]: this rank's heads
            for sock, route in self._socks[decode_idx]:
                heads = host.narrow(4, route.src_offset, route.num_heads)  # [L, 2, n, ps, r, D]
                chunk = protocol.KVChunk(
                    rid=rid,
                    dst_pages=dst_pages[start : start + per_chunk],
                    dtype=dtype_name(self.buffer.dtype),
                    shape=list(heads.shape),
                    data=bytes_view(heads).numpy().tobytes(),
                    is_last=start + per_chunk >= len(src_pages),
                    head_start=route.dst_offset,
                    num_heads=route.num_heads,
                )
                sock.send(protocol.encode(chunk), copy=False)
                num_bytes += len(chunk.data)
        return num_bytes

    def close(self) -> None:
        super().close()
        for socks in self._socks.values():
            for sock, _ in socks:
                sock.close()
        self._socks.clear()
