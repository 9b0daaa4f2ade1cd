"""The prefill budget of steps that carry decodes (`decode_step_prefill_tokens`, Sarathi-Serve's
token budget): such a step never takes more prompt tokens than the cap, every decoding request
still gets its token, and prompts keep moving every step until they are done."""

from __future__ import annotations

import random

import pytest

from pdserve.config.engine_config import SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import ScheduledBatch, Scheduler


def make_scheduler(cap: int, **kw: int) -> Scheduler:
    config = SchedulerConfig(page_size=4, num_pages=4096, decode_step_prefill_tokens=cap, **kw)
    return Scheduler(config, 4096, FinishChecker([], 1 << 16), 1 << 16)


def request(rid: str, prompt_len: int, max_new_tokens: int) -> Request:
    """Prompts of distinct ids: the prefix cache must not do the prefill's work."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    rng = random.Random(rid)
    prompt = [rng.randrange(1, 1 << 20) for _ in range(prompt_len)]
    return Request(rid=rid, prompt_ids=prompt, sampling=params)


def run_step(sched: Scheduler) -> ScheduledBatch | None:
    batch = sched.schedule()
    if batch is None:
        return None
    sched.advance(batch)
    for item in batch.items:
        if item.samples:
            sched.process_sampled(item, 5)
    return batch


def split(batch: ScheduledBatch, decoding: set[str]) -> tuple[int, int]:
    """(decode tokens, prompt tokens) of a step; decodes are the requests that were decoding."""
    num_decode = sum(1 for item in batch.items if item.req.rid in decoding)
    return num_decode, batch.num_tokens - num_decode


def decoding_rids(sched: Scheduler) -> set[str]:
    """Requests one token from their next sample: decodes, as the scheduler counts them (a
    prompt with one token left goes with them)."""
    return {r.rid for r in sched.running if r.num_pending == 1}


def test_a_step_with_decodes_takes_at_most_the_cap_and_every_decode_gets_its_token() -> None:
    sched = make_scheduler(cap=48, max_batch_tokens=4096, chunk_size=1000)
    for i in range(20):
        sched.add(request(f"d{i}", prompt_len=8, max_new_tokens=500))
    run_step(sched)  # the short prompts, alone: no decode yet, so no cap
    for i in range(6):
        sched.add(request(f"long{i}", prompt_len=300 + 37 * i, max_new_tokens=3))
    num_capped_steps = 0
    while any(r.rid.startswith("long") for r in sched.requests.values()):
        decoding = decoding_rids(sched)
        batch = run_step(sched)
        assert batch is not None
        num_decode, num_prompt = split(batch, decoding)
        assert num_decode == len(decoding), "a decoding request was left out of the step"
        if num_decode:
            assert num_prompt <= 48, f"{num_prompt} prompt tokens beside {num_decode} decodes"
            num_capped_steps += num_prompt == 48
    assert num_capped_steps >= 40  # the cap was what bounded those steps, not a lack of work


def test_prompts_progress_every_step_and_finish_in_arrival_order_beside_many_decodes() -> None:
    sched = make_scheduler(cap=16, max_batch_tokens=256, chunk_size=64)
    for i in range(100):  # more decodes than the cap: prefill must still get its share
        sched.add(request(f"d{i}", prompt_len=2, max_new_tokens=10_000))
    run_step(sched)
    prompts = [request(f"p{i}", prompt_len=40 + 10 * i, max_new_tokens=1) for i in range(5)]
    for req in prompts:
        sched.add(req)
    first_token_order: list[str] = []
    for _ in range(200):
        before = sum(r.num_computed for r in prompts)
        decoding = decoding_rids(sched)
        batch = run_step(sched)
        assert batch is not None
        num_decode, num_prompt = split(batch, decoding)
        assert num_decode == 100 and num_prompt <= 16
        assert sum(r.num_computed for r in prompts) > before, "no prompt moved this step"
        first_token_order += [
            r.rid for r in prompts if r.is_finished and r.rid not in first_token_order
        ]
        if len(first_token_order) == len(prompts):
            break
    assert first_token_order == [r.rid for r in prompts]


def test_a_step_without_decodes_fills_max_batch_tokens() -> None:
    sched = make_scheduler(cap=32, max_batch_tokens=512, chunk_size=256)
    for i in range(3):
        sched.add(request(f"p{i}", prompt_len=300, max_new_tokens=4))
    batch = run_step(sched)
    assert batch is not None and batch.num_tokens == 512  # 256 + 256: no decode, no cap


@pytest.mark.parametrize("cap", [0, 1 << 20])
def test_no_cap_or_a_large_one_leaves_max_batch_tokens_in_charge(cap: int) -> None:
    sched = make_scheduler(cap=cap, max_batch_tokens=512, chunk_size=400)
    sched.add(request("d", prompt_len=4, max_new_tokens=100))
    run_step(sched)
    sched.add(request("p", prompt_len=1000, max_new_tokens=1))
    batch = run_step(sched)
    assert batch is not None
    assert [item.num_tokens for item in batch.items] == [1, 400]


def test_random_loads_keep_the_cap_and_every_decode() -> None:
    rng = random.Random(3)
    sched = make_scheduler(cap=24, max_batch_tokens=200, chunk_size=50)
    pending = [
        request(f"r{i}", prompt_len=rng.randrange(1, 120), max_new_tokens=rng.randrange(1, 40))
        for i in range(60)
    ]
    for _ in range(3000):
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        decoding = decoding_rids(sched)
        batch = run_step(sched)
        if batch is None:
            if not pending:
                break
            continue
        num_decode, num_prompt = split(batch, decoding)
        assert num_decode == len(decoding)
        assert num_prompt <= (24 if num_decode else 200)
    assert not pending and not sched.requests, "every request ends"


def test_a_negative_cap_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="decode_step_prefill_tokens=-1"):
        SchedulerConfig(decode_step_prefill_tokens=-1)
