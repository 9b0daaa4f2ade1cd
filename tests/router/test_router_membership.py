"""The router's side of dynamic membership (router/membership.py), without sockets: workers join
with Register, get traffic only once every member applied the table holding them, leave by
draining, and are removed when lost; indices are never reused."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.protocol import (
    Abort,
    Finish,
    GenerateReq,
    Heartbeat,
    Leave,
    PeerTable,
    PeerTableAck,
    Register,
    ReqOutput,
    Shutdown,
)
from pdserve.router import membership as membership_module
from pdserve.router.errors import APIError
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router

LIVENESS_S = 2.0


class _Recorder:
    """Stands in for an outbox: keeps what was sent; `opened` holds every one made."""

    opened: list[_Recorder] = []

    def __init__(self, address: str = "", ctx: Any = None) -> None:
        _Recorder.opened.append(self)
        self.address = address
        self.sent: list[Any] = []
        self.is_closed = False

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.is_closed = True


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Router:
    """A started-looking router with membership, one healthy tokenizer and no worker."""
    monkeypatch.setattr(membership_module, "AsyncOutbox", _Recorder)
    _Recorder.opened = []
    router = Router(
        {
            "model_name": "m",
            "inbox": "ipc://r",
            "tokenizer_inboxes": ["tcp://127.0.0.1:9002"],
            "advertised_tokenizer_inboxes": ["tcp://0.0.0.0:9002"],
            "workers": [],
            "membership": True,
            "liveness_timeout_s": LIVENESS_S,
            "drain_timeout_s": 10.0,
        }
    )
    router.is_started = True
    router.to_tokenizers = [_Recorder()]
    router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=1), 0.0)
    return router


def _register(router: Router, name: str, role: str, pid: int, now: float = 0.0) -> None:
    inbox = f"tcp://10.0.0.{pid % 250}:{9000 + pid}"
    handshake = {"backend": "tcp", "address": inbox + "1"} if role == "decode" else None
    router.membership.on_register(Register(name, role, pid, inbox, handshake, 64), now)


def _ack_all(router: Router) -> None:
    version = router.membership.version
    for name in ["tokenizer0", *router.to_workers]:
        router._dispatch(PeerTableAck(name, version))


def _tables(outbox: Any) -> list[PeerTable]:
    return [m for m in outbox.sent if isinstance(m, PeerTable)]


def _submit(router: Router, rid: str) -> RequestGroup:
    return router.submit(rid, [GenerateReq(rid=rid, sampling={}, text="hi")])


def test_a_lone_router_refuses_with_a_clear_503_until_a_worker_joins(router: Router) -> None:
    with pytest.raises(APIError, match="no decode worker has joined") as e:
        _submit(router, "r0")
    assert e.value.status == 503
    is_ready, body = router.health()
    assert not is_ready and "no decode worker has joined" in body["message"]


def test_a_joined_worker_gets_traffic_once_every_member_applied_its_table(router: Router) -> None:
    _register(router, "p", "prefill", 11)
    _register(router, "d", "decode", 12)
    welcome = _tables(router.to_workers["d"])[-1]
    assert (welcome.for_name, welcome.idx, welcome.version) == ("d", 0, 2)
    assert welcome.prefill_inboxes == ["tcp://10.0.0.11:9011"]
    assert welcome.decode_kv_handshakes == [{"backend": "tcp", "address": "tcp://10.0.0.12:90121"}]
    assert welcome.tokenizer_inboxes == ["tcp://0.0.0.0:9002"]  # the worker fills in the host
    assert _tables(router.to_tokenizers[0])[-1].decode_inboxes == ["tcp://10.0.0.12:9012"]
    for name in ("p", "d"):  # the workers applied it, the tokenizer not yet: no traffic
        router._dispatch(PeerTableAck(name, 2))
    with pytest.raises(APIError, match="has joined"):
        _submit(router, "r0")
    router._dispatch(PeerTableAck("tokenizer0", 2))
    _submit(router, "r1")
    sent = router.to_tokenizers[0].sent[-1]
    assert (sent.rid, sent.decode_idx, sent.prefill_idx) == ("r1", 0, 0)
    assert router.health()[0]


def test_leave_stops_routing_drains_then_lets_the_worker_go(router: Router) -> None:
    for i in range(2):
        _register(router, f"p{i}", "prefill", 20 + i)
        _register(router, f"d{i}", "decode", 30 + i)
    _ack_all(router)
    group = _submit(router, "held")  # round robin: d0 and p0
    d0 = router.to_workers["d0"]
    router._dispatch(Leave("d0", 30))
    _submit(router, "next")
    assert router.tracker.get("next").decode == "d1"  # nothing new for d0
    router._check(1.0)
    assert router.workers.get("d0") is not None
    assert not any(isinstance(m, Shutdown) for m in d0.sent)  # "held" still decodes there
    router._dispatch(
        ReqOutput(rid="held", text_delta="x", output_ids=[1], finish=Finish.at_length(1))
    )
    assert group.queue.get_nowait()[1].finish.kind == "length"  # it finished normally
    router._check(1.5)
    assert isinstance(d0.sent[-1], Shutdown) and d0.is_closed
    assert router.workers.get("d0") is None and "d0" not in router.to_workers
    table = _tables(router.to_workers["p0"])[-1]
    assert table.decode_inboxes == ["", "tcp://10.0.0.31:9031"]  # the slot stays, empty
    _register(router, "d0", "decode", 30)  # a Register it sent before leaving, arriving late
    assert router.workers.get("d0") is None


def test_a_drain_past_its_timeout_ends_the_leftovers_with_503(router: Router) -> None:
    _register(router, "p", "prefill", 11)
    _register(router, "d", "decode", 12)
    _ack_all(router)
    group = _submit(router, "r")
    router.membership.on_leave(Leave("d", 12), now=0.0)
    router.membership.check_drains(5.0)
    assert router.workers.get("d") is not None
    router.membership.check_drains(10.5)
    _, out = group.queue.get_nowait()
    assert out.finish.status_code == 503 and "drain timeout" in out.finish.message
    assert router.workers.get("d") is None


def test_a_silent_worker_ends_its_requests_and_is_removed(router: Router) -> None:
    _register(router, "p", "prefill", 11)
    _register(router, "d", "decode", 12)
    _ack_all(router)
    group = _submit(router, "r")
    router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=1), 2.5)
    router.workers.on_heartbeat(Heartbeat("p", pid=11), 2.5)
    router._check(2.5)  # d: silent since 0.0, past the 2 s timeout
    _, out = group.queue.get_nowait()
    assert out.finish.status_code == 500 and "d is unresponsive" in out.finish.message
    assert router.workers.get("d") is None
    assert _tables(router.to_workers["p"])[-1].decode_inboxes == [""]


def test_a_name_in_use_is_refused_and_a_new_process_replaces_a_lost_one(router: Router) -> None:
    _register(router, "d", "decode", 12)
    _register(router, "d", "decode", 13)  # another live process under the same name
    refusal = _tables(_Recorder.opened[-1])  # sent to the newcomer's own inbox
    assert refusal[0].for_name == "d" and "in the cluster already" in refusal[0].error
    assert router.workers.get("d").live.pid == 12
    assert router.membership.decode_inboxes == ["tcp://10.0.0.12:9012"]
    router.workers.mark_down("d")  # the first one is gone
    _register(router, "d", "decode", 14)
    state = router.workers.get("d")
    assert (state.live.pid, state.spec.idx) == (14, 1)  # a fresh idx: 0 is never reused
    assert router.membership.decode_inboxes == ["", "tcp://10.0.0.14:9014"]


def test_a_repeated_register_is_a_sign_of_life_and_resends_a_missed_table(router: Router) -> None:
    _register(router, "d", "decode", 12)
    outbox = router.to_workers["d"]
    num_tables = len(_tables(outbox))
    router.workers.get("d").live.heard_at = 0.0
    router.membership.on_register(
        Register("d", "decode", 12, "tcp://10.0.0.12:9012", None, 64), now=1.5
    )
    assert router.workers.get("d").live.heard_at == 1.5
    assert len(_tables(outbox)) == num_tables + 1  # it had not acked the latest
    router._dispatch(PeerTableAck("d", router.membership.version))
    router.membership.on_register(
        Register("d", "decode", 12, "tcp://10.0.0.12:9012", None, 64), now=1.6
    )
    assert len(_tables(outbox)) == num_tables + 1


def test_a_router_without_membership_tells_a_joining_worker_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(membership_module, "AsyncOutbox", _Recorder)
    _Recorder.opened = []
    workers = [{"name": "d0", "role": "mixed", "idx": 0, "inbox": "ipc://d0"}]
    static = Router({"model_name": "m", "inbox": "ipc://r", "tokenizer_inboxes": ["ipc://t"],
                     "workers": workers})  # fmt: skip
    static._dispatch(Register("d9", "decode", 9, "tcp://10.0.0.9:9009", None, 64))
    (refusal,) = _tables(_Recorder.opened[-1])
    assert refusal.for_name == "d9" and "membership: true" in refusal.error
    assert static.workers.get("d9") is None


# ---------------------------------------------------------------- tokenizers that join


def _register_tokenizer(router: Router, name: str, pid: int, now: float = 0.0) -> None:
    inbox = f"tcp://10.0.1.{pid % 250}:{9500 + pid}"
    router.membership.on_register(Register(name, "tokenizer", pid, inbox), now)


def _with_tokenizer(router: Router) -> Any:
    """A mixed worker and a joined tokenizer "tok-b" (idx 1), all tables acked; tok-b's outbox."""
    _register(router, "m", "mixed", 11)
    _register_tokenizer(router, "tok-b", 40)
    _ack_all(router)
    router._dispatch(PeerTableAck("tok-b", router.membership.version))
    return router.to_tokenizers[1]


def _routed(outbox: Any) -> list[str]:
    return [m.rid for m in outbox.sent if isinstance(m, GenerateReq)]


def test_a_joined_tokenizer_gets_requests_once_every_member_applied_its_table(
    router: Router,
) -> None:
    _register(router, "m", "mixed", 11)
    _ack_all(router)
    _register_tokenizer(router, "tok-b", 40)
    tok = router.to_tokenizers[1]
    welcome = _tables(tok)[-1]
    assert (welcome.for_name, welcome.idx, welcome.error) == ("tok-b", 1, "")
    assert welcome.decode_inboxes == ["tcp://10.0.0.11:9011"]  # the workers it sends to
    worker_table = _tables(router.to_workers["m"])[-1]  # where the worker sends its tokens
    assert worker_table.tokenizer_inboxes == ["tcp://0.0.0.0:9002", "tcp://10.0.1.40:9540"]
    router._dispatch(PeerTableAck("tok-b", welcome.version))
    router._dispatch(PeerTableAck("tokenizer0", welcome.version))
    for i in range(4):  # the worker has not applied it: it could not send tok-b the tokens
        _submit(router, f"early{i}")
    assert _routed(tok) == []
    router._dispatch(PeerTableAck("m", welcome.version))
    for i in range(4):
        _submit(router, f"r{i}")
    assert len(_routed(tok)) == 2  # round robin over the two tokenizers
    assert all(router.tracker.get(rid).tokenizer_idx == 1 for rid in _routed(tok))
    info = router.server_info()["tokenizers"][1]
    assert (info["name"], info["routable"], info["num_requests"], info["num_in_flight"]) == (
        "tok-b",
        True,
        2,
        2,
    )


def test_a_leaving_tokenizer_gets_nothing_new_and_goes_once_its_requests_end(
    router: Router,
) -> None:
    tok = _with_tokenizer(router)
    _submit(router, "r0")  # tokenizer0
    held = _submit(router, "held")
    assert _routed(tok) == ["held"]
    router._dispatch(Leave("tok-b", 40))
    for i in range(3):
        _submit(router, f"next{i}")
    assert _routed(tok) == ["held"]  # nothing new for tok-b
    router._check(1.0)
    assert not any(isinstance(m, Shutdown) for m in tok.sent)  # "held" is still running there
    assert router.membership.is_member("tok-b")
    router._dispatch(
        ReqOutput(rid="held", text_delta="x", output_ids=[1], finish=Finish.at_length(1))
    )
    assert held.queue.get_nowait()[1].finish.kind == "length"  # it finished normally
    router._check(1.5)
    assert isinstance(tok.sent[-1], Shutdown) and tok.is_closed
    assert router.workers.process("tok-b") is None
    assert _tables(router.to_workers["m"])[-1].tokenizer_inboxes == ["tcp://0.0.0.0:9002", ""]
    router.to_tokenizers[1].send(Abort(rid="late", message="x"))  # a NoPeer now: dropped
    _register_tokenizer(router, "tok-b", 40)  # a Register sent before it left, arriving late
    assert router.workers.process("tok-b") is None and len(router.to_tokenizers) == 2


def test_a_silent_tokenizer_ends_its_requests_and_is_removed(router: Router) -> None:
    tok = _with_tokenizer(router)
    _submit(router, "r0")
    lost = _submit(router, "lost")
    assert _routed(tok) == ["lost"]
    router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=1), 2.5)
    router.workers.on_heartbeat(Heartbeat("m", pid=11), 2.5)
    router._check(2.5)  # tok-b: silent since 0.0, past the 2 s timeout
    _, out = lost.queue.get_nowait()
    assert out.finish.status_code == 500 and "tok-b is unresponsive" in out.finish.message
    assert any(isinstance(m, Abort) and m.rid == "lost" for m in router.to_workers["m"].sent)
    assert router.workers.process("tok-b") is None
    assert _tables(router.to_workers["m"])[-1].tokenizer_inboxes[1] == ""
    _submit(router, "after")
    assert router.tracker.get("after").tokenizer_idx == 0


def test_the_routers_own_tokenizer_can_neither_be_joined_as_nor_made_to_leave(
    router: Router,
) -> None:
    _register_tokenizer(router, "tokenizer0", 50)
    (refusal,) = _tables(_Recorder.opened[-1])
    assert refusal.for_name == "tokenizer0" and "a process the router started" in refusal.error
    assert router.workers.process("tokenizer0").live.pid == 1
    assert len(router.to_tokenizers) == 1 and not router.membership.is_member("tokenizer0")
    router._dispatch(Leave("tokenizer0", 1))  # only a process that joined may leave this way
    assert router.workers.healthy_tokenizers()[0].name == "tokenizer0"
