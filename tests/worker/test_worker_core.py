"""WorkerCore on the tiny model (CPU): one request's bad sampling parameter ends that request
alone; the rest of its batch samples on, token for token as if it had been alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.protocol import Finish
from pdserve.scheduler.request import Request
from pdserve.worker.worker_core import WorkerCore

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def core(tiny_llama: Path) -> WorkerCore:
    """The plain loop: these tests read each step's results as it returns (the overlapped loop
    returns them a step later; tests/worker/test_overlap.py checks it gives the same tokens)."""
    config = EngineConfig(
        model_path=str(tiny_llama),
        device="cpu",
        scheduler=SchedulerConfig(num_pages=128, page_size=4),
    )
    return WorkerCore(config, overlap=False)


def sampled_params(logit_bias: dict[int, float] | None = None) -> SamplingParams:
    """Greedy, but with a logit bias, so the batch goes through the full sampler."""
    bias = logit_bias if logit_bias is not None else {3: 0.5}
    return SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logit_bias=bias)


def run_to_end(core: WorkerCore) -> list[Request]:
    touched: list[Request] = []
    for _ in range(100):
        if not core.has_work():
            return touched
        touched += core.step()
    raise AssertionError("the core never ran out of work")


def assert_pages_released(core: WorkerCore) -> None:
    sched = core.scheduler
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.allocator.num_free + sched.cache.num_cached_pages == sched.allocator.num_total
    assert sched.cache.num_locked_pages == 0


@pytest.mark.parametrize("bad_row", [0, 1])
def test_a_poisoned_row_ends_only_its_request_and_the_batch_goes_on(
    core: WorkerCore, bad_row: int
) -> None:
    alone = Request(rid="alone", prompt_ids=PROMPT, sampling=sampled_params())
    core.add(alone)
    run_to_end(core)
    good = Request(rid="good", prompt_ids=PROMPT, sampling=sampled_params())
    bad = Request(rid="bad", prompt_ids=[10, 11, 12], sampling=sampled_params())
    for req in [good, bad] if bad_row else [bad, good]:
        core.add(req)
    # Past the vocabulary, set after every check at the edge and at intake.
    vocab_size = core.model_config.vocab_size
    bad.sampling = sampled_params(logit_bias={vocab_size + 5: 1.0})

    touched = core.step()
    assert bad in touched and good in touched
    assert bad.finish is not None and bad.finish.is_abort and bad.finish.status_code == 400
    assert "logit_bias" in bad.finish.message and bad.output_ids == []
    assert good.finish is None and len(good.output_ids) == 1
    run_to_end(core)
    assert good.output_ids == alone.output_ids and good.finish == Finish.at_length(6)
    assert_pages_released(core)


def test_a_batch_of_only_poisoned_rows_ends_them_all_and_the_core_keeps_serving(
    core: WorkerCore,
) -> None:
    vocab_size = core.model_config.vocab_size
    reqs = [Request(rid=f"bad{i}", prompt_ids=PROMPT, sampling=sampled_params()) for i in range(2)]
    for req in reqs:
        core.add(req)
        req.sampling = sampled_params(logit_bias={vocab_size: 1.0})
    assert set(core.step()) == set(reqs)
    assert all(req.finish is not None and req.finish.is_abort for req in reqs)
    after = Request(rid="after", prompt_ids=PROMPT, sampling=sampled_params())
    core.add(after)
    run_to_end(core)
    assert after.finish == Finish.at_length(6)
    assert_pages_released(core)


def test_a_sampling_parameter_outside_the_vocabulary_is_refused_at_intake(
    core: WorkerCore,
) -> None:
    vocab_size = core.model_config.vocab_size
    req = Request(
        rid="refused", prompt_ids=PROMPT, sampling=sampled_params(logit_bias={vocab_size: 1.0})
    )
    with pytest.raises(ValueError, match="logit_bias"):
        core.add(req)
    with pytest.raises(ValueError, match="out of range"):
        core.add(Request(rid="ids", prompt_ids=[vocab_size], sampling=sampled_params()))
    assert not core.scheduler.requests
