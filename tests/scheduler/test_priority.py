"""Priority in the waiting queues, on synthetic requests: online (0) before batch lines (-1), first
come first served within a priority, preempted requests keep their place, and the decode side's
queue for pages follows the same order."""

from __future__ import annotations

import random

import pytest

from pdserve.config.engine_config import SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.kv_handoff import KVHandoff, SendPrefillTask
from pdserve.scheduler.request import Request, Status
from pdserve.scheduler.scheduler import Scheduler
from pdserve.scheduler.waiting_queue import ONLINE_PRIORITY, WaitingQueue

EOS = 0
BATCH = -1
PAGE_SIZE = 4


def make_scheduler(num_pages: int = 64, **kw: int) -> Scheduler:
    config = SchedulerConfig(page_size=PAGE_SIZE, num_pages=num_pages, **kw)
    return Scheduler(config, num_pages, FinishChecker([EOS], 4096), 4096)


def request(
    rid: str, priority: int = ONLINE_PRIORITY, prompt_len: int = 8, out: int = 4
) -> Request:
    params = SamplingParams(max_new_tokens=out, ignore_eos=True)
    prompt = [1 + (hash(rid) + i) % 50 for i in range(prompt_len)]
    return Request(rid=rid, prompt_ids=prompt, sampling=params, priority=priority)


def admitted_rids(sched: Scheduler) -> list[str]:
    """Run one step; the rids admitted by it, in admission order."""
    before = {id(r) for r in sched.running}
    batch = sched.schedule()
    assert batch is not None
    admitted = [item.req.rid for item in batch.items if id(item.req) not in before]
    sched.advance(batch)
    for item in batch.items:
        if item.samples:
            sched.process_sampled(item, 7)
    return admitted


# ---------------------------------------------------------------------- the queue itself


def test_queue_serves_higher_priority_first_and_fifo_within_one() -> None:
    queue: WaitingQueue[tuple[str, int]] = WaitingQueue(lambda item: item[1])
    arrivals = [("b1", BATCH), ("o1", 0), ("b2", BATCH), ("hi", 5), ("o2", 0), ("b3", BATCH)]
    for item in arrivals:
        queue.append(item)
    assert len(queue) == 6 and queue[0] == ("hi", 5)
    assert [name for name, _ in queue] == ["hi", "o1", "o2", "b1", "b2", "b3"]
    queue.remove(("o1", 0))
    queue.appendleft(("b0", BATCH))  # put back: ahead of its own priority, not of online
    assert [queue.popleft()[0] for _ in range(len(queue))] == ["hi", "o2", "b0", "b1", "b2", "b3"]
    assert not queue
    with pytest.raises(IndexError):
        queue.popleft()


def test_queue_matches_a_sorted_model_under_random_operations() -> None:
    rng = random.Random(0)
    queue: WaitingQueue[tuple[int, int]] = WaitingQueue(lambda item: item[0])
    model: list[tuple[int, int]] = []  # kept in service order: (-priority, arrival)
    front = -1
    for seq in range(2000):
        op = rng.random()
        if op < 0.5:
            item = (rng.choice([-2, -1, 0, 3]), seq)
            queue.append(item)
            model.append(item)
        elif op < 0.6 and model:
            front -= 1  # an item put back goes ahead of its band: model it with an early seq
            prio = rng.choice([-2, -1, 0, 3])
            queue.appendleft((prio, front))
            model.append((prio, front))
        elif op < 0.8 and model:
            victim = rng.choice(model)
            queue.remove(victim)
            model.remove(victim)
        elif model:
            model.sort(key=lambda it: (-it[0], it[1]))
            assert queue.popleft() == model.pop(0)
        model.sort(key=lambda it: (-it[0], it[1]))
        assert list(queue) == model and len(queue) == len(model)


# ---------------------------------------------------------------------- the scheduler


def test_online_requests_are_admitted_before_queued_batch_lines() -> None:
    sched = make_scheduler(max_running_requests=2)
    for i in range(4):
        sched.add(request(f"batch{i}", BATCH))
    sched.add(request("online0"))
    sched.add(request("online1"))
    assert admitted_rids(sched) == ["online0", "online1"]


def test_fifo_within_a_priority_when_admission_is_one_at_a_time() -> None:
    sched = make_scheduler(max_running_requests=1)
    order = ["b0", "o0", "b1", "o1", "b2"]
    for rid in order:
        sched.add(request(rid, ONLINE_PRIORITY if rid.startswith("o") else BATCH, out=1))
    served = []
    while sched.has_work():
        served += admitted_rids(sched)
    assert served == ["o0", "o1", "b0", "b1", "b2"]


def test_a_batch_line_arriving_first_does_not_delay_a_later_online_request() -> None:
    # Pages for one request at a time: the online request waits only for the one running.
    sched = make_scheduler(num_pages=4, max_running_requests=8)
    sched.add(request("batch0", BATCH, prompt_len=8, out=1))
    assert admitted_rids(sched) == ["batch0"]
    sched.add(request("batch1", BATCH, prompt_len=8, out=1))
    sched.add(request("online", prompt_len=8, out=1))
    served = []
    while sched.has_work():
        served += admitted_rids(sched)
    assert served == ["online", "batch1"]


def test_preemption_takes_the_lowest_priority_first_and_it_keeps_its_place() -> None:
    # 6 pages of 4 tokens: two requests of 8 prompt tokens fill 4 pages and grow until one must go.
    sched = make_scheduler(num_pages=6, max_running_requests=8)
    sched.add(request("batch_old", BATCH, prompt_len=8, out=12))
    sched.add(request("online", prompt_len=8, out=12))
    admitted_rids(sched)
    assert {r.rid for r in sched.running} == {"batch_old", "online"}
    sched.add(request("batch_new", BATCH, prompt_len=4, out=1))  # waits: no pages left over
    while sched.num_preemptions == 0:
        admitted_rids(sched)
    preempted = [r for r in sched.requests.values() if r.num_preemptions]
    assert [r.rid for r in preempted] == ["batch_old"]  # older than "online", but lower priority
    assert [r.rid for r in sched.waiting] == ["batch_old", "batch_new"]
    assert preempted[0].status == Status.WAITING


def test_abort_of_a_waiting_request_removes_it_from_its_priority() -> None:
    sched = make_scheduler(max_running_requests=1)
    for rid, prio in [("o0", 0), ("b0", BATCH), ("b1", BATCH)]:
        sched.add(request(rid, prio))
    sched.abort("b0")
    assert [r.rid for r in sched.waiting] == ["o0", "b1"] and sched.num_waiting == 2


# ---------------------------------------------------------------------- the decode handoff


def test_decode_handoff_reserves_pages_for_online_requests_first() -> None:
    sched = make_scheduler(max_running_requests=2)
    handoff = KVHandoff(sched, 10.0, needs_arrival=True, frees_on_cancel=True)
    for rid, prio in [("b0", BATCH), ("b1", BATCH), ("o0", 0), ("b2", BATCH), ("o1", 0)]:
        handoff.add(request(rid, prio), prefill_idx=0)
    actions = handoff.reserve(now=0.0)
    assert [a.req.rid for a in actions if isinstance(a, SendPrefillTask)] == ["o0", "o1"]
    handoff.check_integrity()
    handoff.on_abort("o0", "gone", now=0.0)
    handoff.on_abort("o1", "gone", now=0.0)
    actions = handoff.reserve(now=0.0)
    assert [a.req.rid for a in actions if isinstance(a, SendPrefillTask)] == ["b0", "b1"]
    handoff.check_integrity()


def test_a_request_preempted_after_it_was_scheduled_leaves_the_step() -> None:
    # "batch_old" comes first in the decode loop and is scheduled; "online", after it, needs a
    # page at its first decode (8 prompt tokens fill 2 pages of 4), none is free, and it preempts
    # batch_old (lower priority): the step must not run batch_old on the pages it gave back.
    # (5 pages: one is the pool's padding page.)
    sched = make_scheduler(num_pages=5, max_running_requests=8)
    sched.add(request("batch_old", BATCH, prompt_len=6, out=12))
    assert admitted_rids(sched) == ["batch_old"]
    sched.add(request("online", prompt_len=8, out=12))
    assert admitted_rids(sched) == ["online"]
    while sched.num_preemptions == 0:
        batch = sched.schedule()
        assert batch is not None
        for item in batch.items:
            assert item.req.status == Status.RUNNING, item.req.rid
            assert len(item.req.page_ids) * PAGE_SIZE >= item.start + item.num_tokens
        sched.advance(batch)
        for item in batch.items:
            if item.samples:
                sched.process_sampled(item, 7)
    assert [r.rid for r in sched.waiting] == ["batch_old"]
