"""The decode side's KV handoff on a real scheduler (no model): every state x event, late and
duplicate messages, backpressure, and page conservation after every event of a seeded fuzz."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest

from pdserve.config.engine_config import SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import KVFailed, KVReady
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.kv_handoff import (
    AbortPrefill,
    Action,
    Admit,
    EndRequest,
    HandoffState,
    KVHandoff,
    SendPrefillTask,
)
from pdserve.scheduler.request import Request, Status
from pdserve.scheduler.scheduler import Scheduler

TIMEOUT_S = 10.0
PAGE_SIZE = 4
EOS = 0


class Backend(NamedTuple):
    needs_arrival: bool
    frees_on_cancel: bool


TCP = Backend(needs_arrival=True, frees_on_cancel=True)  # nccl behaves the same
CUDA_IPC = Backend(needs_arrival=False, frees_on_cancel=False)

QUEUED, RESERVED, ANNOUNCED, ARRIVED, HELD = (
    HandoffState.QUEUED,
    HandoffState.RESERVED,
    HandoffState.ANNOUNCED,
    HandoffState.ARRIVED,
    HandoffState.HELD,
)


def make(backend: Backend, num_pages: int = 64, **kw: int) -> tuple[Scheduler, KVHandoff]:
    config = SchedulerConfig(page_size=PAGE_SIZE, num_pages=num_pages, **kw)
    sched = Scheduler(config, num_pages, FinishChecker([EOS], 4096), 4096)
    return sched, KVHandoff(sched, TIMEOUT_S, backend.needs_arrival, backend.frees_on_cancel)


def new_request(rid: str, prompt_len: int = 10, max_new_tokens: int = 5) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return Request(rid=rid, prompt_ids=list(range(1, prompt_len + 1)), sampling=params)


def perform(sched: Scheduler, actions: list[Action]) -> None:
    """What the decode role does with the actions that touch pages: admit into the scheduler."""
    for action in actions:
        if isinstance(action, Admit):
            sched.commit_transferred(action.req, action.ready)


def check_pages(sched: Scheduler, handoff: KVHandoff) -> None:
    """Every usable page is free, cached, held by the handoff, or owned by a running request."""
    handoff.check_integrity()
    held = handoff.held_page_ids()
    owned = [p for r in sched.requests.values() for p in r.page_ids[r.num_shared_pages :]]
    assert not set(held) & set(owned), "a page is both held for a transfer and running"
    assert len(owned) == len(set(owned))
    cached = sched.cache.num_cached_pages
    assert sched.allocator.num_free + cached + len(held) + len(owned) == sched.allocator.num_total
    sched.cache.check_integrity()


def ready(rid: str) -> KVReady:
    return KVReady(rid=rid, first_token=7, cached_tokens=4)


def drive_to(state: HandoffState, backend: Backend) -> tuple[Scheduler, KVHandoff, Request]:
    sched, handoff = make(backend)
    req = new_request("r")
    handoff.add(req, prefill_idx=1)
    if state != QUEUED:
        assert handoff.reserve(now=0.0) == [SendPrefillTask(req, 1, req.page_ids)]
    if state == ANNOUNCED:
        assert handoff.on_kv_ready(ready("r")) == []
    elif state == ARRIVED:
        assert handoff.on_arrived("r") == []
    elif state == HELD:
        assert handoff.on_abort("r", "client gone", now=1.0)[0].is_pages_held
    assert handoff.state_of("r") == state
    check_pages(sched, handoff)
    return sched, handoff, req


def fire(handoff: KVHandoff, rid: str, event: str) -> list[Action]:
    now = 2.0
    if event == "room":
        return handoff.reserve(now)
    if event == "kv_ready":
        return handoff.on_kv_ready(ready(rid))
    if event == "kv_failed":
        return handoff.on_kv_failed(KVFailed(rid, "prefill failed", 400))
    if event == "arrived":
        return handoff.on_arrived(rid)
    if event == "receiver_failed":
        return handoff.on_transfer_failed(rid, "broken peer", now)
    if event == "abort":
        return handoff.on_abort(rid, "client gone", now)
    assert event == "deadline"
    return handoff.expire(now + 3 * TIMEOUT_S)  # past any in-flight deadline, and a held one


class Outcome(NamedTuple):
    state: HandoffState | None  # None: no longer in the table
    actions: tuple[str, ...]  # action types, in order
    pages: str  # none (queued) | reserved (held by the handoff) | freed | running


def out(state: HandoffState | None, actions: str, pages: str) -> Outcome:
    return Outcome(state, tuple(actions.split()), pages)


EVENTS = ("room", "kv_ready", "kv_failed", "arrived", "receiver_failed", "abort", "deadline")

# (state, backend that reaches it) -> the outcome of each event, in EVENTS order.
EXPECTED: dict[tuple[HandoffState, Backend], tuple[Outcome, ...]] = {
    (QUEUED, TCP): (
        out(RESERVED, "SendPrefillTask", "reserved"),
        out(QUEUED, "", "none"),
        out(QUEUED, "", "none"),
        out(QUEUED, "", "none"),
        out(QUEUED, "", "none"),
        out(None, "EndRequest", "none"),
        out(QUEUED, "", "none"),  # no deadline while waiting for pages
    ),
    (RESERVED, TCP): (
        out(RESERVED, "", "reserved"),
        out(ANNOUNCED, "", "reserved"),
        out(None, "EndRequest", "freed"),
        out(ARRIVED, "", "reserved"),
        out(None, "EndRequest", "freed"),
        out(None, "EndRequest", "freed"),
        out(None, "AbortPrefill EndRequest", "freed"),
    ),
    (RESERVED, CUDA_IPC): (
        out(RESERVED, "", "reserved"),
        out(None, "Admit", "running"),  # nothing to wait for: KVReady means written
        out(None, "EndRequest", "freed"),  # the prefill let go: free at once
        out(ARRIVED, "", "reserved"),
        out(HELD, "EndRequest", "reserved"),  # the sender may still write into the pages
        out(HELD, "EndRequest", "reserved"),
        out(HELD, "AbortPrefill EndRequest", "reserved"),
    ),
    (ANNOUNCED, TCP): (
        out(ANNOUNCED, "", "reserved"),
        out(ANNOUNCED, "", "reserved"),  # a duplicate KVReady
        out(None, "EndRequest", "freed"),
        out(None, "Admit", "running"),
        out(None, "EndRequest", "freed"),
        out(None, "EndRequest", "freed"),
        out(None, "EndRequest", "freed"),  # the prefill is done with it: no AbortPrefill
    ),
    (ARRIVED, TCP): (
        out(ARRIVED, "", "reserved"),
        out(None, "Admit", "running"),
        out(None, "EndRequest", "freed"),
        out(ARRIVED, "", "reserved"),  # a duplicate arrival
        out(ARRIVED, "", "reserved"),  # the bytes are in: a late receiver failure is moot
        out(None, "EndRequest", "freed"),
        out(None, "AbortPrefill EndRequest", "freed"),
    ),
    (HELD, CUDA_IPC): (
        out(HELD, "", "reserved"),
        out(None, "", "freed"),  # the sender let go
        out(None, "", "freed"),
        out(HELD, "", "reserved"),
        out(HELD, "", "reserved"),
        out(HELD, "", "reserved"),  # a second abort
        out(None, "", "freed"),  # a second timeout: the prefill is gone
    ),
}

CASES = [
    pytest.param(state, backend, event, expected, id=f"{state.value}-{name}-{event}")
    for (state, backend), outcomes in EXPECTED.items()
    for event, expected in zip(EVENTS, outcomes, strict=True)
    for name in ["tcp" if backend == TCP else "cuda_ipc"]
]


@pytest.mark.parametrize(("state", "backend", "event", "expected"), CASES)
def test_every_state_and_event_moves_pages_as_the_table_says(
    state: HandoffState, backend: Backend, event: str, expected: Outcome
) -> None:
    sched, handoff, req = drive_to(state, backend)
    reserved = list(req.page_ids)
    actions = fire(handoff, "r", event)
    perform(sched, actions)
    assert handoff.state_of("r") == expected.state
    assert tuple(type(a).__name__ for a in actions) == expected.actions
    check_pages(sched, handoff)
    if expected.pages == "none":
        assert req.page_ids == [] and sched.allocator.num_free == sched.allocator.num_total
    elif expected.pages == "reserved":
        assert req.page_ids == (reserved or req.page_ids) == handoff.held_page_ids() != []
    elif expected.pages == "freed":
        assert req.page_ids == [] and req.status == Status.FINISHED
        assert sched.allocator.num_free == sched.allocator.num_total
    else:
        assert sched.running == [req] and req.page_ids == reserved
        assert req.output_ids == [7] and req.num_cached_tokens == 4


@pytest.mark.parametrize("event", ["kv_failed", "receiver_failed", "abort", "deadline"])
def test_an_ended_request_carries_why_and_whether_the_client_is_told(event: str) -> None:
    sched, handoff, req = drive_to(RESERVED, TCP)
    (end,) = [a for a in fire(handoff, "r", event) if isinstance(a, EndRequest)]
    expected = {
        "kv_failed": ("prefill failed", 400, True),
        "receiver_failed": ("KV transfer failed: broken peer", 500, True),
        "abort": ("client gone", 400, False),  # the router has ended the client already
        "deadline": ("KV transfer timed out after 10 s", 504, True),
    }[event]
    assert end.req is req and req.finish is not None and req.finish.is_abort
    assert (req.finish.message, req.finish.status_code, end.notify) == expected


def test_a_timeout_asks_the_prefill_it_was_sent_to_to_drop_the_request() -> None:
    sched, handoff, req = drive_to(RESERVED, TCP)
    assert handoff.expire(now=TIMEOUT_S - 1) == []  # not yet
    actions = handoff.expire(now=TIMEOUT_S + 1)
    assert actions[0] == AbortPrefill("r", 1)


def test_held_pages_wait_for_the_prefill_then_a_second_timeout() -> None:
    sched, handoff, req = drive_to(HELD, CUDA_IPC)  # aborted at t=1, reserved at t=0
    assert handoff.expire(now=2 * TIMEOUT_S - 1) == [] and handoff.state_of("r") == HELD
    assert not handoff.has_work() and handoff.num_waiting == 0
    handoff.expire(now=2 * TIMEOUT_S + 1)
    assert "r" not in handoff and sched.allocator.num_free == sched.allocator.num_total


def test_late_and_duplicate_messages_after_the_end_change_nothing() -> None:
    sched, handoff, req = drive_to(ARRIVED, TCP)
    perform(sched, handoff.on_kv_ready(ready("r")))
    assert sched.running == [req]
    free_before = sched.allocator.num_free
    for event in EVENTS:
        assert fire(handoff, "r", event) == []  # admitted: the handoff no longer knows it
    assert handoff.on_kv_ready(ready("unknown")) == []
    assert handoff.on_kv_failed(KVFailed("unknown", "x")) == []
    assert sched.running == [req] and sched.allocator.num_free == free_before
    check_pages(sched, handoff)


def test_an_id_in_use_or_a_prompt_larger_than_the_pool_is_refused() -> None:
    sched, handoff = make(TCP, num_pages=9)  # 8 usable pages: 32 tokens
    handoff.add(new_request("r"), prefill_idx=0)
    with pytest.raises(ValueError, match="already in use"):
        handoff.add(new_request("r"), prefill_idx=0)
    with pytest.raises(ValueError, match="does not fit"):
        handoff.add(new_request("big", prompt_len=40), prefill_idx=0)
    assert handoff.rids == ["r"]


def test_requests_wait_in_order_for_pages_and_max_running_counts_those_in_flight() -> None:
    sched, handoff = make(TCP, num_pages=9)  # 8 usable pages; each request takes 3
    reqs = [new_request(f"r{i}") for i in range(4)]
    for req in reqs:
        handoff.add(req, prefill_idx=0)
    sent = handoff.reserve(now=0.0)
    assert [a.req.rid for a in sent] == ["r0", "r1"]  # r2 would need a 9th page
    assert handoff.num_waiting == 4 and handoff.num_in_flight == 2
    perform(sched, handoff.on_kv_failed(KVFailed("r0", "prefill failed")))
    assert [a.req.rid for a in handoff.reserve(now=1.0)] == ["r2"]
    check_pages(sched, handoff)

    sched, handoff = make(TCP, num_pages=64, max_running_requests=2)
    for req in [new_request(f"r{i}") for i in range(3)]:
        handoff.add(req, prefill_idx=0)
    assert [a.req.rid for a in handoff.reserve(now=0.0)] == ["r0", "r1"]
    perform(sched, handoff.on_arrived("r0") + handoff.on_kv_ready(ready("r0")))
    assert handoff.reserve(now=1.0) == []  # one running + one in flight
    assert len(sched.running) == 1 and handoff.state_of("r2") == QUEUED


def test_an_admitted_request_whose_first_token_ends_it_frees_its_pages() -> None:
    sched, handoff = make(CUDA_IPC)
    req = new_request("r", max_new_tokens=1)
    handoff.add(req, prefill_idx=0)
    handoff.reserve(now=0.0)
    perform(sched, handoff.on_kv_ready(ready("r")))
    assert req.finish is not None and req.finish.kind == "length"
    assert not sched.running and sched.allocator.num_free + sched.cache.num_cached_pages == 63


# ---------------------------------------------------------------- seeded fuzz


def _random_event(
    rng: random.Random, handoff: KVHandoff, rids: list[str], now: float
) -> list[Action]:
    live = handoff.rids
    rid = rng.choice(live) if live and rng.random() < 0.8 else rng.choice(rids)  # or a late one
    kind = rng.choices(EVENTS + ("step",), weights=(2, 3, 1, 3, 1, 1, 1, 2))[0]
    if kind == "room":
        return handoff.reserve(now)
    if kind == "kv_ready":
        return handoff.on_kv_ready(ready(rid))
    if kind == "kv_failed":
        return handoff.on_kv_failed(KVFailed(rid, "prefill failed"))
    if kind == "arrived":
        return handoff.on_arrived(rid)
    if kind == "receiver_failed":
        return handoff.on_transfer_failed(rid, "broken peer", now)
    if kind == "abort":
        return handoff.on_abort(rid, "client gone", now)
    return handoff.expire(now)  # "deadline" and "step": time passes


def _step_running(sched: Scheduler) -> None:
    batch = sched.schedule()
    if batch is None:
        return
    sched.advance(batch)
    for item in batch.items:
        if item.samples:
            sched.process_sampled(item, 5)
    sched.newly_finished.clear()


@pytest.mark.parametrize("backend", [TCP, CUDA_IPC], ids=["tcp", "cuda_ipc"])
@pytest.mark.parametrize("seed", range(8))
def test_random_events_keep_every_page_accounted_and_end_each_request_once(
    seed: int, backend: Backend
) -> None:
    rng = random.Random(seed)
    sched, handoff = make(backend, num_pages=24, max_running_requests=6)
    rids = [f"r{i}" for i in range(25)]
    pending = [new_request(rid, prompt_len=rng.randrange(1, 20)) for rid in rids]
    ended: dict[str, int] = {rid: 0 for rid in rids}
    now = 0.0
    for _ in range(600):
        now += rng.random() * TIMEOUT_S / 20
        if pending and rng.random() < 0.3:
            handoff.add(pending.pop(), prefill_idx=rng.randrange(2))
        actions = _random_event(rng, handoff, rids, now)
        perform(sched, actions)
        for action in actions:
            if isinstance(action, (Admit, EndRequest)):
                ended[action.req.rid] += 1
        _step_running(sched)
        check_pages(sched, handoff)
    while handoff.rids or pending:  # let everything finish: time runs out for the rest
        if pending:
            handoff.add(pending.pop(), prefill_idx=0)
        now += 3 * TIMEOUT_S
        actions = handoff.reserve(now) + handoff.expire(now)
        perform(sched, actions)
        for action in actions:
            if isinstance(action, (Admit, EndRequest)):
                ended[action.req.rid] += 1
        _step_running(sched)
        check_pages(sched, handoff)
    while sched.running:
        _step_running(sched)
    assert ended == {rid: 1 for rid in rids}
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.num_total
    assert sched.cache.num_locked_pages == 0
