"""Inboxes survive any bytes (dropped and counted), and tcp sockets admit only holders of the
cluster secret (CURVE): a peer with the wrong secret, or none, cannot deliver a single frame."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from pdserve import curve_auth, protocol
from pdserve.entrypoints.launch import _free_port
from pdserve.ipc import AsyncInbox, Inbox, Outbox, new_ipc_address, push_socket

SECRET = "right-secret-0123456789"

GARBAGE = [
    b"",
    b"\x01\x02",
    os.urandom(64),
    msgpack.packb([999, []]),
    msgpack.packb([1, "not a list"]),
    b"\x91" * 5000 + b"\xc0",
    # well-formed frames of the wrong types
    protocol.encode(protocol.TokenizedReq(rid=5, input_ids="abc", sampling=[], tokenizer_idx="0")),
    protocol.encode(protocol.Shutdown(grace_s="now")),
    protocol.encode(protocol.Abort(rid=["r"], abort_all=1)),
]


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    curve_auth.set_cluster_secret(None)
    yield
    curve_auth.set_cluster_secret(None)


def _push_raw(address: str, frames: list[bytes]) -> None:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(address)
    for frame in frames:
        sock.send(frame)
    sock.close(linger=2000)


def _recv_until(inbox: Inbox, count: int, timeout_ms: int = 5000) -> list[object]:
    got: list[object] = []
    for _ in range(50):
        if len(got) >= count:
            break
        msg = inbox.recv(timeout_ms=timeout_ms // 50)
        got += ([msg] if msg is not None else []) + inbox.recv_all()
    return got


def test_inbox_drops_and_counts_garbage_and_keeps_receiving(no_secret: None) -> None:
    inbox = Inbox(new_ipc_address("test-inbox"))
    good = protocol.Abort(rid="r1")
    _push_raw(inbox.address, [*GARBAGE, protocol.encode(good), *GARBAGE])
    got = _recv_until(inbox, 1)
    assert got == [good]
    while inbox.recv(timeout_ms=100) is not None or inbox.recv_all():
        pass
    assert inbox.num_dropped == 2 * len(GARBAGE)
    inbox.close()


def test_async_inbox_skips_garbage_to_the_next_message(no_secret: None) -> None:
    async def run() -> tuple[object, int]:
        inbox = AsyncInbox(new_ipc_address("test-async"), zmq.asyncio.Context())
        _push_raw(inbox.address, [*GARBAGE, protocol.encode(protocol.FlushCache())])
        msg = await asyncio.wait_for(inbox.recv(), timeout=5)
        inbox.close()
        return msg, inbox.num_dropped

    msg, num_dropped = asyncio.run(run())
    assert msg == protocol.FlushCache() and num_dropped == len(GARBAGE)


def test_dropped_frames_are_logged_at_most_once_per_interval(
    no_secret: None, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = Inbox(new_ipc_address("test-log"))
    with caplog.at_level(logging.WARNING, logger="pdserve.ipc"):
        _push_raw(inbox.address, [b"\x01\x02"] * 200 + [protocol.encode(protocol.FlushCache())])
        assert _recv_until(inbox, 1) == [protocol.FlushCache()]
    assert inbox.num_dropped == 200
    lines = [r for r in caplog.records if "dropped a frame" in r.getMessage()]
    assert len(lines) == 1 and "(1 so far)" in lines[0].getMessage()
    inbox.close()


def _send_from_another_process(address: str, secret: str | None) -> None:
    """A separate process (its own secret, or none) sends one Shutdown to `address`."""
    code = (
        "import sys; from pdserve.ipc import Outbox; from pdserve.protocol import Shutdown; "
        "out = Outbox(sys.argv[1]); out.send(Shutdown(grace_s=1.5)); out.close()"
    )
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_CLUSTER_SECRET"}
    if secret is not None:
        env["PDSERVE_CLUSTER_SECRET"] = secret
    subprocess.run([sys.executable, "-c", code, address], env=env, check=True, timeout=60)


def test_only_a_peer_holding_the_cluster_secret_can_deliver_over_tcp(no_secret: None) -> None:
    curve_auth.set_cluster_secret(SECRET)
    inbox = Inbox(f"tcp://127.0.0.1:{_free_port()}")
    _send_from_another_process(inbox.address, "wrong-secret-0123456789")
    _send_from_another_process(inbox.address, None)  # no CURVE at all
    _push_raw(inbox.address, [protocol.encode(protocol.Shutdown())])  # plain, in this process
    assert inbox.recv(timeout_ms=1500) is None
    assert inbox.num_dropped == 0  # refused in the handshake: nothing reached the loop

    _send_from_another_process(inbox.address, SECRET)
    assert inbox.recv(timeout_ms=10_000) == protocol.Shutdown(grace_s=1.5)
    inbox.close()


def test_tcp_round_trip_in_one_process_with_a_secret(no_secret: None) -> None:
    curve_auth.set_cluster_secret(SECRET)
    inbox = Inbox(f"tcp://127.0.0.1:{_free_port()}")
    out = Outbox(inbox.address)
    out.send(protocol.Abort(rid="x"))
    assert inbox.recv(timeout_ms=5000) == protocol.Abort(rid="x")
    out.close()
    inbox.close()


def test_ipc_sockets_stay_plain_when_a_secret_is_set(no_secret: None) -> None:
    curve_auth.set_cluster_secret(SECRET)
    inbox = Inbox(new_ipc_address("test-plain"))
    _push_raw(inbox.address, [protocol.encode(protocol.FlushCache())])
    assert inbox.recv(timeout_ms=5000) == protocol.FlushCache()
    inbox.close()


def test_keys_are_derived_from_the_secret_and_short_secrets_are_refused(no_secret: None) -> None:
    a, b = curve_auth.keys_from_secret(SECRET), curve_auth.keys_from_secret(SECRET + "x")
    assert a == curve_auth.keys_from_secret(SECRET)
    assert a.server_public != b.server_public and a.client_public != a.server_public
    assert len(a.server_public) == 40  # z85 of 32 bytes
    with pytest.raises(ValueError, match="at least 16 characters"):
        curve_auth.set_cluster_secret("short")
    assert curve_auth.cluster_keys() is None
    assert curve_auth.child_env(None) == {}
    assert curve_auth.child_env(SECRET) == {"PDSERVE_CLUSTER_SECRET": SECRET}


def test_tcp_sockets_use_curve_only_with_a_secret(no_secret: None) -> None:
    ctx, address = zmq.Context.instance(), f"tcp://127.0.0.1:{_free_port()}"
    plain = push_socket(ctx, address)
    curve_auth.set_cluster_secret(SECRET)
    secured = push_socket(ctx, address)
    local = push_socket(ctx, new_ipc_address("test-mech"))
    assert plain.get(zmq.MECHANISM) == zmq.NULL and local.get(zmq.MECHANISM) == zmq.NULL
    assert secured.get(zmq.MECHANISM) == zmq.CURVE
    for sock in (plain, secured, local):
        sock.close(0)


def test_every_zmq_socket_is_made_in_ipc_py() -> None:
    """So none can skip CURVE on tcp (a heartbeat socket once did)."""
    root = Path(__file__).resolve().parents[1] / "pdserve"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "ipc.py" and ".socket(zmq." in path.read_text()
    ]
    assert offenders == [], f"make sockets with ipc.pull_socket/push_socket: {offenders}"
