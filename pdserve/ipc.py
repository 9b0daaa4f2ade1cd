"""ZeroMQ wiring: every process binds one PULL inbox and connects PUSH sockets to its peers' inboxes.

Addresses are `ipc://...` on one node and `tcp://host:port` across nodes; both come from the topology.
Payloads are always `protocol.encode` bytes (msgpack), never pickle.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import zmq
import zmq.asyncio

from pdserve import protocol
from pdserve.protocol import Message

_HWM = 0  # unbounded queues: backpressure is the decode worker's admission, not the socket


def new_socket_dir() -> str:
    """A private folder for one cluster's ipc:// sockets; the launcher removes it at stop.

    Never named plain `pdserve`: a folder of that name in a child's working directory would be
    imported as the package itself."""
    return tempfile.mkdtemp(prefix="pdserve-sockets-")


def _default_socket_dir() -> str:
    folder = os.path.join(tempfile.gettempdir(), f"pdserve-sockets-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


def new_ipc_address(name: str, folder: str | None = None) -> str:
    """A fresh ipc:// endpoint in `folder` (default: a per-user temp folder)."""
    folder = folder or _default_socket_dir()
    return f"ipc://{folder}/{name}-{uuid.uuid4().hex[:10]}.sock"


def pull_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A bound PULL socket with an unbounded queue (every inbox, and the KV data sockets)."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    return sock


def push_socket(ctx: zmq.Context, address: str, linger_ms: int = 1000) -> zmq.Socket:
    """A connected PUSH socket that never blocks; queued messages get linger_ms to leave."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.connect(address)
    return sock


class Inbox:
    """A process's one PULL socket (blocking; for the worker loops)."""

    def __init__(self, address: str, ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = pull_socket(self.ctx, address)
        self.address = address

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return protocol.decode(self.sock.recv())

    def recv_all(self) -> list[Message]:
        """Every message waiting now, without blocking."""
        out = []
        while True:
            try:
                out.append(protocol.decode(self.sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    def close(self) -> None:
        self.sock.close(0)


class Outbox:
    """A PUSH socket to one peer's inbox."""

    def __init__(self, address: str, ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = push_socket(self.ctx, address)
        self.address = address

    def send(self, msg: Message) -> None:
        self.sock.send(protocol.encode(msg))

    def close(self) -> None:
        self.sock.close()


class AsyncInbox:
    """A PULL inbox for asyncio processes (router, tokenizer_proc)."""

    def __init__(self, address: str, ctx: zmq.asyncio.Context | None = None) -> None:
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = pull_socket(self.ctx, address)
        self.address = address

    async def recv(self) -> Message:
        return protocol.decode(await self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)


class AsyncOutbox:
    """A PUSH socket for asyncio processes; send never blocks (unbounded queue)."""

    def __init__(self, address: str, ctx: zmq.asyncio.Context | None = None) -> None:
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = push_socket(self.ctx, address)
        self.address = address

    def send(self, msg: Message) -> None:
        self.sock.send(protocol.encode(msg), zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close()
