"""A worker's side of membership (worker/joining.py) without a model: the router's welcome gives it
its idx and its peers, wildcard tokenizer addresses become the router's host, a refusal is kept
for the retry, and SIGTERM tells the router it leaves, a second one stops it at once."""

from __future__ import annotations

import signal
from types import SimpleNamespace
from typing import Any

import pytest

from pdserve import protocol
from pdserve.config.engine_config import EngineConfig
from pdserve.config.process_specs import KVTransferSpec, WorkerSpec
from pdserve.membership import NoPeer
from pdserve.worker import joining
from pdserve.worker.joining import JoinedWorker, JoinOptions


class _Box:
    def __init__(self, address: str, ctx: Any = None) -> None:
        self.address = address
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        pass


class _Sock:
    def getsockopt(self, option: int) -> bytes:
        return b"tcp://0.0.0.0:9100"  # bound on every interface


class _Role:
    def __init__(self) -> None:
        self.decode_idx = 0
        self.handshake = {"backend": "tcp", "address": "tcp://10.0.0.7:9101"}


class _FakeWorkerProcess:
    def __init__(self, spec: WorkerSpec) -> None:
        self.inbox = type("Inbox", (), {"sock": _Sock()})()
        self.role = _Role()
        self.core = SimpleNamespace(runner=SimpleNamespace(num_pages=64))
        self.to_decodes: list[Any] = []
        self.to_prefills: list[Any] = []
        self.to_tokenizers: list[Any] = []
        self.to_router = _Box("tcp://router:8001")
        self.handlers: dict[type, Any] = {}
        self.is_running = True

    def add_handler(self, msg_type: type, handler: Any) -> None:
        self.handlers[msg_type] = handler

    def stop(self) -> None:
        self.is_running = False


@pytest.fixture
def joined(monkeypatch: pytest.MonkeyPatch) -> JoinedWorker:
    monkeypatch.setattr(joining, "WorkerProcess", _FakeWorkerProcess)
    monkeypatch.setattr(joining, "Outbox", _Box)
    spec = WorkerSpec(
        name="d-7",
        role="decode",
        idx=0,
        engine=EngineConfig(model_path="/m", device="cpu"),
        inbox="tcp://0.0.0.0:9100",
        tokenizer_inboxes=(),
        kv=KVTransferSpec(backend="tcp", timeout_s=5.0),
        router_inbox="tcp://router:8001",
    )
    return JoinedWorker(spec, JoinOptions("tcp://router:8001", advertise_host="10.0.0.7"))


def _table(**fields: Any) -> protocol.PeerTable:
    base = {
        "version": 3,
        "decode_inboxes": ["tcp://10.0.0.5:9000", "tcp://10.0.0.7:9100"],
        "prefill_inboxes": ["tcp://10.0.0.6:9000"],
        "tokenizer_inboxes": ["tcp://0.0.0.0:8002", "tcp://0.0.0.0:8003"],
        "for_name": "d-7",
        "idx": 1,
    }
    return protocol.PeerTable(**{**base, **fields})


def test_the_welcome_gives_the_idx_the_peers_and_an_ack(joined: JoinedWorker) -> None:
    assert joined.address == "tcp://10.0.0.7:9100"  # the wildcard bind, as peers dial it
    register = joined.register_msg()
    assert (register.kv_handshake, register.num_pages) == (joined.worker.role.handshake, 64)
    joined.worker.handlers[protocol.PeerTable](_table())
    worker = joined.worker
    assert joined.idx == 1 and worker.role.decode_idx == 1  # its PrefillTasks name it
    assert [b.address for b in worker.to_tokenizers] == ["tcp://router:8002", "tcp://router:8003"]
    assert worker.to_prefills[0].address == "tcp://10.0.0.6:9000"
    assert isinstance(worker.to_decodes[1], NoPeer)  # itself
    assert worker.to_router.sent == [protocol.PeerTableAck("d-7", 3)]
    joined.worker.handlers[protocol.PeerTable](_table(for_name="someone-else", version=4))
    assert len(worker.to_router.sent) == 1  # not for it: ignored


def test_a_refusal_is_kept_for_the_retry_and_joins_nothing(joined: JoinedWorker) -> None:
    joined.on_peer_table(_table(error="a worker named 'd-7' is in the cluster already", idx=-1))
    assert joined.idx == -1 and "in the cluster already" in joined.refusal
    assert joined.worker.to_router.sent == [] and joined.worker.is_running


def test_sigterm_leaves_by_draining_and_a_second_one_stops_now(joined: JoinedWorker) -> None:
    joined.on_peer_table(_table())
    joined._on_signal(signal.SIGTERM, None)
    (leave,) = joined._to_router.sent
    assert isinstance(leave, protocol.Leave) and leave.name == "d-7"
    assert joined.is_leaving.is_set() and joined.worker.is_running  # it drains meanwhile
    joined.worker.handlers[protocol.Shutdown](protocol.Shutdown())  # the router lets it go
    assert not joined.worker.is_running
    joined.worker.is_running = True
    joined._on_signal(signal.SIGTERM, None)
    assert not joined.worker.is_running and len(joined._to_router.sent) == 1
