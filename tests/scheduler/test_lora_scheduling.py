"""The scheduler with LoRA: never more distinct adapters in the running set than adapter slots,
no request fails for lack of a slot, and the prefix cache shares KV only under one adapter."""

from __future__ import annotations

import random

from test_scheduler import EOS, check_pages, step

from pdserve.config.engine_config import SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import Scheduler

ADAPTERS = {None: 0, "a": 1, "b": 2, "c": 3}  # name -> prefix-cache namespace (lora_key)


def lora_scheduler(max_loras: int) -> Scheduler:
    config = SchedulerConfig(page_size=4, num_pages=256)
    return Scheduler(config, 256, FinishChecker([EOS], 4096), 4096, max_loras_per_batch=max_loras)


def lora_request(rid: str, prompt: list[int], lora: str | None, max_new: int = 4) -> Request:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return Request(rid, prompt, params, lora_name=lora, lora_key=ADAPTERS[lora])


def test_batches_never_hold_more_adapters_than_slots_and_all_finish() -> None:
    rng = random.Random(0)
    sched = lora_scheduler(max_loras=2)
    reqs = [
        lora_request(str(i), [rng.randrange(1, 50) for _ in range(9)], rng.choice(list(ADAPTERS)))
        for i in range(40)
    ]
    for req in reqs:
        sched.add(req)
    finished = 0
    for _ in range(500):
        if not sched.has_work():
            break
        running = {r.lora_name for r in sched.running if r.lora_name is not None}
        assert len(running) <= 2
        finished += len(step(sched, rng))
        check_pages(sched)
    assert finished == len(reqs) and all(r.finish.kind == "length" for r in reqs)


def test_prefix_cache_is_shared_within_an_adapter_only() -> None:
    rng = random.Random(1)
    sched = lora_scheduler(max_loras=4)
    prompt = list(range(1, 18))  # four full pages of 4 tokens, and one more token

    def run(rid: str, lora: str | None) -> Request:
        req = lora_request(rid, prompt, lora, max_new=1)
        sched.add(req)
        while sched.has_work():
            step(sched, rng)
        return req

    assert run("base-1", None).num_cached_tokens == 0
    assert run("a-1", "a").num_cached_tokens == 0  # the base model's KV is not reused
    assert run("a-2", "a").num_cached_tokens == 16  # the same adapter's is
    assert run("b-1", "b").num_cached_tokens == 0
    assert run("base-2", None).num_cached_tokens == 16
    check_pages(sched)


def test_decode_reservations_count_adapters_in_flight() -> None:
    sched = lora_scheduler(max_loras=1)
    first = lora_request("1", [1, 2, 3], "a")
    assert sched.reserve_for_transfer(first, 0) is not None
    assert sched.reserve_for_transfer(lora_request("2", [1, 2], "b"), 1) is None
    assert sched.reserve_for_transfer(lora_request("3", [1, 2], "a"), 1) is not None
    assert sched.reserve_for_transfer(lora_request("4", [1, 2], None), 2) is not None
    sched.free_reserved(first)
    assert sched.lora_in_use("a") and not sched.lora_in_use("b")
