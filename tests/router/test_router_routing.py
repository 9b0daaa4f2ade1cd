"""Routing policies, process liveness bookkeeping, the request tracker and the spec, without
sockets; and which requests each kind of lost process takes down."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.protocol import Finish, Heartbeat, LoadReport, ProcessExited, ReqOutput
from pdserve.router.errors import APIError
from pdserve.router.request_tracker import RequestGroup, RequestTracker, Tracked
from pdserve.router.router import Router, finish_label
from pdserve.router.routing import LeastLoad, RoundRobin, make_policy
from pdserve.router.worker_registry import Liveness, WorkerRegistry


def _workers() -> tuple[WorkerEntry, ...]:
    return (
        WorkerEntry("p0", "prefill", 0, "ipc://p0"),
        WorkerEntry("p1", "prefill", 1, "ipc://p1"),
        WorkerEntry("d0", "decode", 0, "ipc://d0"),
        WorkerEntry("d1", "decode", 1, "ipc://d1"),
        WorkerEntry("d2", "decode", 2, "ipc://d2"),
    )


def _report(name: str, role: str, running: int, queued: int = 0, free: int = 50) -> LoadReport:
    return LoadReport(name, role, running, queued, free, 100, 0, 0.0, 1.0)


def _registry(now: float = 0.0) -> WorkerRegistry:
    reg = WorkerRegistry(_workers(), liveness_timeout_s=1.0)
    for w in _workers():
        reg.on_report(_report(w.name, w.role, 0), now)
    return reg


def test_round_robin_cycles_each_side_independently_over_healthy_workers() -> None:
    reg = _registry()
    decode_rr, prefill_rr = RoundRobin(), RoundRobin()
    decodes = [decode_rr.pick(reg.decode_side()).name for _ in range(6)]
    prefills = [prefill_rr.pick(reg.prefill()).name for _ in range(4)]
    assert decodes == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert prefills == ["p0", "p1", "p0", "p1"]
    reg.mark_down("d1")
    picked = {decode_rr.pick(reg.decode_side()).name for _ in range(4)}
    assert picked == {"d0", "d2"}


def test_least_load_picks_fewest_running_plus_queued() -> None:
    reg = _registry()
    reg.on_report(_report("d0", "decode", running=5, queued=1), 0.0)
    reg.on_report(_report("d1", "decode", running=2, queued=2), 0.0)
    reg.on_report(_report("d2", "decode", running=3, queued=0), 0.0)
    assert LeastLoad().pick(reg.decode_side()).name == "d2"


def test_least_load_breaks_ties_by_free_pages() -> None:
    reg = _registry()
    reg.on_report(_report("d0", "decode", 1, free=10), 0.0)
    reg.on_report(_report("d1", "decode", 1, free=80), 0.0)
    reg.on_report(_report("d2", "decode", 1, free=40), 0.0)
    assert LeastLoad().pick(reg.decode_side()).name == "d1"


def test_least_load_counts_requests_sent_since_the_last_report() -> None:
    reg = _registry()
    policy = LeastLoad()
    picks = []
    for _ in range(6):
        chosen = policy.pick(reg.decode_side())
        reg.note_sent(chosen.name)
        picks.append(chosen.name)
    assert sorted(picks) == ["d0", "d0", "d1", "d1", "d2", "d2"]
    reg.on_report(_report("d0", "decode", 0), 0.0)  # a fresh report replaces the local count
    assert reg.get("d0").load == 0 and reg.get("d1").load == 2


def test_make_policy_refuses_unknown_names() -> None:
    assert isinstance(make_policy("least_load"), LeastLoad)
    with pytest.raises(ValueError, match="routing_policy"):
        make_policy("random")


def test_missing_reports_make_a_worker_unhealthy_until_reports_resume() -> None:
    reg = _registry(now=0.0)
    assert reg.all_healthy()
    assert reg.expire(0.5) == []
    reg.on_report(_report("d0", "decode", 0), 1.2)
    assert sorted(reg.expire(1.5)) == ["d1", "d2", "p0", "p1"]
    assert reg.expire(1.6) == []  # reported once
    assert reg.get("d0").is_healthy and not reg.get("d1").is_healthy
    reg.on_report(_report("d1", "decode", 0), 1.7)
    assert reg.get("d1").is_healthy


def test_an_exited_worker_stays_down_until_a_new_process_beats() -> None:
    reg = _registry()
    reg.on_heartbeat(Heartbeat("p0", pid=100), 0.0)
    assert reg.mark_down("p0", pid=100, restarting=True) is not None
    reg.on_report(_report("p0", "prefill", 0), 0.1)  # queued before the exit
    reg.on_heartbeat(Heartbeat("p0", pid=100), 0.2)
    assert reg.get("p0").live.status == "restarting" and reg.get("p0").report is None
    assert [s.name for s in reg.prefill()] == ["p1"]
    reg.on_heartbeat(Heartbeat("p0", pid=101), 0.3)  # the restarted process
    assert reg.get("p0").is_healthy and reg.get("p0").live.pid == 101
    assert reg.mark_down("nope") is None  # unknown names are logged, never raised


def test_liveness_ignores_the_exit_of_a_process_whose_successor_is_up() -> None:
    live = Liveness()
    assert live.heard(0.0, pid=7) is True
    assert live.exited(7, restarting=True) is True
    assert live.heard(0.5, pid=8) is True
    assert live.exited(7, restarting=True) is False  # reported twice, or late
    assert live.is_healthy
    assert live.expire(5.0, timeout_s=1.0) is True and live.status == "unresponsive"
    assert live.heard(5.1) is True  # a load report: an unresponsive process is back


def test_tokenizers_are_tracked_like_workers() -> None:
    reg = WorkerRegistry(_workers(), liveness_timeout_s=1.0, tokenizer_names=("t0", "t1"))
    for w in _workers():
        reg.on_report(_report(w.name, w.role, 0), 0.0)
    assert not reg.all_healthy()  # the tokenizers have not been heard from
    reg.on_heartbeat(Heartbeat("t0", pid=1), 0.0)
    reg.on_heartbeat(Heartbeat("t1", pid=2), 0.5)
    assert reg.all_healthy()
    assert sorted(reg.expire(1.2)) == ["d0", "d1", "d2", "p0", "p1", "t0"]
    assert [t.name for t in reg.healthy_tokenizers()] == ["t1"]
    assert [p.name for p in reg.processes()][:2] == ["t0", "t1"]


def test_tracker_finds_requests_by_rid_group_and_worker() -> None:
    async def run() -> None:
        tracker = RequestTracker()
        group = RequestGroup("g", ["g-0", "g-1"])
        tracker.add(Tracked("g-0", group, 0, 0, "d0", "p0"))
        tracker.add(Tracked("g-1", group, 1, 1, "d1", "p0"))
        assert tracker.rids_of("g") == ["g-0", "g-1"]
        assert tracker.rids_of("g-1") == ["g-1"]
        assert [t.rid for t in tracker.lost_with_worker("p0", "prefill")] == ["g-0", "g-1"]
        tracker.get("g-0").num_output_tokens = 2  # a token from decode: handed over
        assert [t.rid for t in tracker.lost_with_worker("p0", "prefill")] == ["g-1"]
        assert [t.rid for t in tracker.lost_with_worker("d1", "decode")] == ["g-1"]
        assert [t.rid for t in tracker.lost_with_tokenizer(1)] == ["g-1"]
        with pytest.raises(ValueError, match="in flight"):
            tracker.add(Tracked("g-0", group, 0, 0, "d0", "p0"))
        tracker.pop("g-0")
        tracker.pop("g-1")
        assert len(tracker) == 0 and "g" not in tracker.groups

    asyncio.run(run())


def test_finish_labels_separate_client_aborts_from_server_failures() -> None:
    def out(finish: dict | None, error: str | None = None) -> ReqOutput:
        return ReqOutput("r", "", [], finish, error=error)

    assert finish_label(out(Finish.stop(2))) == "stop"
    assert finish_label(out(Finish.at_length(4))) == "length"
    assert finish_label(out(Finish.abort("x"))) == "abort"
    assert finish_label(out(Finish.abort("x", 500))) == "error"
    assert finish_label(out(None, error="too long")) == "error"


def _spec_dict(**overrides: object) -> dict:
    spec = {
        "model_name": "m",
        "inbox": "ipc://r",
        "tokenizer_inboxes": ["ipc://t"],
        "workers": [{"name": "d0", "role": "mixed", "idx": 0, "inbox": "ipc://d0"}],
    }
    spec.update(overrides)
    return spec


def test_spec_errors_name_the_bad_key() -> None:
    assert RouterSpec.from_dict(_spec_dict()).liveness_timeout_s == 5.0
    with pytest.raises(ValueError, match="routing_policy"):
        RouterSpec.from_dict(_spec_dict(routing_policy="fastest"))
    with pytest.raises(ValueError, match="colour"):
        RouterSpec.from_dict(_spec_dict(colour="red"))
    with pytest.raises(ValueError, match="role"):
        RouterSpec.from_dict(
            _spec_dict(workers=[{"name": "a", "role": "x", "idx": 0, "inbox": ""}])
        )
    with pytest.raises(ValueError, match="decode or mixed"):
        RouterSpec.from_dict(
            _spec_dict(workers=[{"name": "a", "role": "prefill", "idx": 0, "inbox": "ipc://a"}])
        )
    with pytest.raises(ValueError, match="tokenizer_inboxes"):
        RouterSpec.from_dict(_spec_dict(tokenizer_inboxes=[]))


def test_router_routes_mixed_workers_without_prefill() -> None:
    router = Router(_spec_dict())
    router.workers.on_report(_report("d0", "mixed", 0), 0.0)
    router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=1), 0.0)
    tok_idx, decode, prefill = router._route()
    assert (tok_idx, decode.name, prefill) == (0, "d0", None)


class _Recorder:
    """Stands in for an outbox: keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)


def _pd_router(**spec: object) -> Router:
    """A started-looking router over p0, d0, d1 and two tokenizers, all healthy, no sockets."""
    workers = [
        {"name": "p0", "role": "prefill", "idx": 0, "inbox": "ipc://p0"},
        {"name": "d0", "role": "decode", "idx": 0, "inbox": "ipc://d0"},
        {"name": "d1", "role": "decode", "idx": 1, "inbox": "ipc://d1"},
    ]
    router = Router(_spec_dict(workers=workers, tokenizer_inboxes=["ipc://t0", "ipc://t1"], **spec))
    router.is_started = True
    router.to_tokenizers = [_Recorder(), _Recorder()]
    router.to_workers = {w["name"]: _Recorder() for w in workers}
    for w in workers:
        router.workers.on_heartbeat(Heartbeat(w["name"], pid=10 + w["idx"]), 0.0)
    for i in range(2):
        router.workers.on_heartbeat(Heartbeat(f"tokenizer{i}", pid=20 + i), 0.0)
    return router


def _track(router: Router, rid: str, tok: int, decode: str, num_tokens: int) -> RequestGroup:
    group = RequestGroup(rid, [rid])
    router.tracker.add(Tracked(rid, group, 0, tok, decode, "p0", num_output_tokens=num_tokens))
    return group


def _ended_with(group: RequestGroup) -> str | None:
    if group.queue.empty():
        return None
    _, out = group.queue.get_nowait()
    assert out.finish is not None and out.finish.is_error
    return out.finish.message


def test_a_dead_prefill_ends_only_the_requests_it_has_not_handed_over() -> None:
    router = _pd_router()
    waiting = _track(router, "waiting", 0, "d0", num_tokens=0)
    first_only = _track(router, "first-only", 1, "d1", num_tokens=1)  # KV may be in flight
    decoding = _track(router, "decoding", 0, "d1", num_tokens=5)
    router._on_exit(ProcessExited("p0", pid=10, exit_code=-9, restarting=True), "killed")
    assert "p0" in _ended_with(waiting) and "p0" in _ended_with(first_only)
    assert _ended_with(decoding) is None and "decoding" in router.tracker
    aborted = {m.rid for m in router.to_workers["d0"].sent + router.to_workers["d1"].sent}
    assert aborted == {"waiting", "first-only"}  # decode frees the pages it reserved
    is_ready, body = router.health()
    assert not is_ready and body["unhealthy"] == ["p0"]
    assert body["processes"]["p0"] == "restarting" and body["processes"]["tokenizer1"] == "healthy"


def test_a_dead_decode_or_tokenizer_ends_every_request_it_holds() -> None:
    router = _pd_router()
    on_d0 = _track(router, "a", 0, "d0", num_tokens=9)
    on_d1_t1 = _track(router, "b", 1, "d1", num_tokens=9)
    on_d1_t0 = _track(router, "c", 0, "d1", num_tokens=9)
    router._on_exit(ProcessExited("d0", pid=10, exit_code=-9), "killed")
    assert _ended_with(on_d0) and _ended_with(on_d1_t1) is None
    router._on_exit(ProcessExited("tokenizer1", pid=21, exit_code=-9), "killed")
    assert "tokenizer1" in _ended_with(on_d1_t1) and _ended_with(on_d1_t0) is None
    assert router.health()[1]["processes"]["d0"] == "down"


def test_routing_goes_around_a_dead_tokenizer_and_refuses_without_any() -> None:
    router = _pd_router()
    router.mark_unhealthy("tokenizer0", "killed")
    assert {router._route()[0] for _ in range(4)} == {1}
    router.mark_unhealthy("tokenizer1", "killed")
    with pytest.raises(APIError, match="no healthy tokenizer"):
        router._route()
    assert not router.can_serve()
    router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=99), 1.0)  # restarted
    assert router._route()[0] == 0


def test_a_request_without_progress_ends_with_504_unless_it_waits_behind_busy_work() -> None:
    router = _pd_router(progress_timeout_s=10.0)
    stalled = _track(router, "stalled", 0, "d0", num_tokens=3)  # started, then nothing
    queued = _track(router, "queued", 0, "d0", num_tokens=0)  # waits its turn on busy d0
    idle = _track(router, "idle", 0, "d1", num_tokens=0)  # d1 produced nothing at all
    moving = _track(router, "moving", 0, "d1", num_tokens=3)
    now = router.tracker.get("stalled").created + 11.0
    router.tracker.get("moving").progress_at = now - 1.0
    router.workers.note_output("d0", now - 1.0)  # d0 streams for other requests
    for name in ("p0", "d0", "d1", "tokenizer0", "tokenizer1"):  # alive throughout
        router.workers.process(name).live.heard_at = now
    router._check(now)
    for group in (stalled, idle):
        _, out = group.queue.get_nowait()
        assert out.finish.status_code == 504 and "no progress for 10 s" in out.finish.message
    assert queued.queue.empty() and moving.queue.empty()
    assert "queued" in router.tracker and "moving" in router.tracker
