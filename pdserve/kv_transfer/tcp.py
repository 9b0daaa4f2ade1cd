"""KV transfer staged through host memory over ZeroMQ: works anywhere (CPU, GPU, across nodes).

The sender gathers pages, copies them to the host and pushes `KVChunk` messages (whole pages, at most
`CHUNK_BYTES` each) to the receiver's own PULL socket; the receiver checks and scatters them in poll().
Across nodes the socket is CURVE authenticated like every internal tcp socket (`ipc.py`); a frame
that is not a valid chunk is dropped and counted (`num_dropped`), never raised into the worker loop.
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
        self._page_nbytes = self.buffer[:, :, 0].numel() * self.buffer.element_size()

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
        self._land(msg.rid, list(msg.dst_pages), data)

    def _check_chunk(self, msg: protocol.KVChunk) -> str:
        """'' when msg matches this pool's page layout, else what is wrong."""
        if msg.dtype != dtype_name(self.buffer.dtype):
            return f"dtype {msg.dtype!r}, expected {dtype_name(self.buffer.dtype)!r}"
        expected = staging_shape(self.buffer, len(msg.dst_pages))
        if list(msg.shape) != expected:
            return f"shape {list(msg.shape)}, expected {expected}"
        if len(msg.data) != len(msg.dst_pages) * self._page_nbytes:
            return f"{len(msg.data)} bytes, expected {len(msg.dst_pages) * self._page_nbytes}"
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
        self._socks: dict[int, zmq.Socket] = {}

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        self._socks[decode_idx] = connect_push(handshake["address"])

    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        page_nbytes = self.buffer[:, :, 0].numel() * self.buffer.element_size()
        per_chunk = max(1, self.chunk_bytes // page_nbytes)
        sock = self._socks[decode_idx]
        num_bytes = 0
        for start in range(0, len(src_pages), per_chunk):
            if time.perf_counter() > deadline:
                raise KVTransferError(
                    f"request {rid}: KV transfer timed out after {start} of {len(src_pages)} pages"
                )
            src = src_pages[start : start + per_chunk]
            host = self._gather(src).cpu()  # [L, 2, n, ps, Hkv, D]
            chunk = protocol.KVChunk(
                rid=rid,
                dst_pages=dst_pages[start : start + per_chunk],
                dtype=dtype_name(self.buffer.dtype),
                shape=list(host.shape),
                data=bytes_view(host).numpy().tobytes(),
                is_last=start + per_chunk >= len(src_pages),
            )
            sock.send(protocol.encode(chunk), copy=False)
            num_bytes += len(chunk.data)
        return num_bytes

    def close(self) -> None:
        super().close()
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
