"""The worker core's warm-up (worker/warm_up.py, run at startup on CUDA): it runs a prompt, decodes
and a mixed step through the loop, then leaves nothing behind: no request, no cached or held page,
no step count; and a request served afterwards gets the tokens a fresh core gives it (greedy,
random prompts)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.worker.warm_up import warm_up
from pdserve.worker.worker_core import WorkerCore


def make_core(model: Path, overlap: bool) -> WorkerCore:
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=64)
    return WorkerCore(
        EngineConfig(model_path=str(model), device="cpu", scheduler=sched), overlap=overlap
    )


def serve(core: WorkerCore, prompts: list[list[int]]) -> list[list[int]]:
    reqs = [
        Request(
            rid=f"r{i}", prompt_ids=p, sampling=SamplingParams(max_new_tokens=6, temperature=0.0)
        )
        for i, p in enumerate(prompts)
    ]
    for req in reqs:
        core.add(req)
    for _ in range(500):
        if not core.has_work():
            break
        core.step()
    assert all(r.finish is not None for r in reqs)
    return [list(r.output_ids) for r in reqs]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_warm_up_leaves_nothing_behind(tiny_llama: Path, overlap: bool) -> None:
    rng = random.Random()
    core = make_core(tiny_llama, overlap)
    assert core.num_steps == 0  # on the CPU the core does not warm itself up
    free_before = core.scheduler.allocator.num_free
    steps = []
    real_step = core.step
    core.step = lambda: steps.append(1) or real_step()  # type: ignore[method-assign]
    warm_up(core)
    core.step = real_step  # type: ignore[method-assign]
    assert len(steps) >= 4, "the warm-up ran no loop"
    sched = core.scheduler
    assert not sched.running and not len(sched.waiting) and not sched.newly_finished
    assert not core.has_work()
    assert sched.allocator.num_free == free_before, "pages stayed held or cached"
    assert core.num_steps == 0 and core.num_overlapped_steps == 0
    vocab = core.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(3, 40))] for _ in range(4)]
    assert serve(core, prompts) == serve(make_core(tiny_llama, overlap), prompts)


def test_warm_up_fits_a_small_pool_and_context(tiny_llama: Path) -> None:
    """A pool of 16 pages of 4 tokens or a context limit of 20 tokens leaves nothing worth
    warming up (its requests would not fit); a pool of 48 pages takes shorter ones. No error, and
    nothing left behind, either way."""
    for pages, context in ((16, None), (256, 20), (48, None)):
        sched = SchedulerConfig(
            num_pages=pages, page_size=4, chunk_size=64, max_context_len=context
        )
        core = WorkerCore(EngineConfig(model_path=str(tiny_llama), device="cpu", scheduler=sched))
        free_before = core.scheduler.allocator.num_free
        warm_up(core)
        assert not core.has_work() and core.scheduler.allocator.num_free == free_before


def test_warm_up_runs_short_and_split_decodes_beside_a_chunk(tiny_llama: Path) -> None:
    """The mixed steps of the warm-up hold decodes short enough for the decode kernel's one-split
    variant and, later, one long enough for its split-and-merge variant (contexts over two of its
    64-token steps), each beside a prefill chunk, so no serving step compiles either."""
    core = make_core(tiny_llama, overlap=True)
    mixed_contexts: list[int] = []  # per mixed step: the longest decode's context
    real_schedule = core.scheduler.schedule

    def schedule():  # type: ignore[no-untyped-def]
        batch = real_schedule()
        if batch is not None:
            decodes = [it for it in batch.items if it.num_tokens == 1]
            chunks = [it for it in batch.items if it.num_tokens > 1]
            if decodes and chunks:
                mixed_contexts.append(max(it.start + 1 for it in decodes))
        return batch

    core.scheduler.schedule = schedule  # type: ignore[method-assign]
    warm_up(core)
    assert mixed_contexts, "no decode ran beside a prefill chunk"
    assert min(mixed_contexts) <= 128, mixed_contexts
    assert max(mixed_contexts) > 128, mixed_contexts
