"""Routing policies, worker health bookkeeping, the request tracker and the spec, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.protocol import Finish, LoadReport, ReqOutput
from pdserve.router.request_tracker import RequestGroup, RequestTracker, Tracked
from pdserve.router.router import Router, finish_label
from pdserve.router.routing import LeastLoad, RoundRobin, make_policy
from pdserve.router.worker_registry import WorkerRegistry


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
    reg = WorkerRegistry(_workers(), report_timeout_s=1.0)
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
    reg.mark_dead("d1")
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


def test_a_worker_marked_dead_stays_unhealthy_despite_late_reports() -> None:
    reg = _registry()
    assert reg.mark_dead("p0") is True
    reg.on_report(_report("p0", "prefill", 0), 0.1)
    assert not reg.get("p0").is_healthy
    assert [s.name for s in reg.prefill()] == ["p1"]
    with pytest.raises(KeyError):
        reg.mark_dead("nope")


def test_tracker_finds_requests_by_rid_group_and_worker() -> None:
    async def run() -> None:
        tracker = RequestTracker()
        group = RequestGroup("g", ["g-0", "g-1"])
        tracker.add(Tracked("g-0", group, 0, 0, "d0", "p0"))
        tracker.add(Tracked("g-1", group, 1, 1, "d1", "p0"))
        assert tracker.rids_of("g") == ["g-0", "g-1"]
        assert tracker.rids_of("g-1") == ["g-1"]
        assert [t.rid for t in tracker.on_worker("p0")] == ["g-0", "g-1"]
        assert [t.rid for t in tracker.on_worker("d1")] == ["g-1"]
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
    assert RouterSpec.from_dict(_spec_dict()).report_timeout_s == 5.0
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
    router.to_tokenizers = [object()]  # only counted by _route
    tok_idx, decode, prefill = router._route()
    assert (tok_idx, decode.name, prefill) == (0, "d0", None)
