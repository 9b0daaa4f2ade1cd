"""A tensor-parallel worker core on CPU (gloo): rank 0 in this process, rank 1 a follower process
it starts. Greedy tokens, logprobs, prompt logprobs (the LOGITS command) and hidden states (the
FORWARD_ROWS command) equal a tp 1 core's; closing stops the follower; a follower that dies makes
the next step fail with a message naming it instead of hanging.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.worker_core import WorkerCore

TOL = 1e-4


def _core(path: Path, tp_size: int) -> WorkerCore:
    sched = SchedulerConfig(num_pages=128, page_size=4, chunk_size=6)
    return WorkerCore(
        EngineConfig(model_path=str(path), device="cpu", scheduler=sched, tp_size=tp_size)
    )


@pytest.fixture(scope="module")
def cores(tiny_models: dict[str, Path]) -> Iterator[tuple[WorkerCore, WorkerCore]]:
    path = tiny_models[
        "qwen3"
    ]  # qk_norm, tied embeddings: the vocab-parallel head is the embedding
    tp2 = _core(path, 2)
    yield _core(path, 1), tp2
    tp2.close()


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    return [torch.randint(3, 300, (int(k),), generator=gen).tolist() for k in (3, 9, 14, 1)[:n]]


def _run(core: WorkerCore, prompts: list[list[int]], **fields) -> list[Request]:
    reqs = []
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        extra = fields.get("outputs")
        req = Request(
            f"r{i}",
            list(ids),
            params,
            return_logprob=fields.get("return_logprob", False),
            top_logprobs_num=fields.get("top_logprobs_num", 0),
        )
        if extra is not None:
            req.outputs = extra()
            req.max_reused_tokens = req.outputs.first_needed_position()
        core.add(req)
        reqs.append(req)
    for _ in range(200):
        if not core.has_work():
            break
        core.step()
    assert all(r.finish is not None and not r.finish.is_abort for r in reqs)
    return reqs


def test_tp2_core_greedy_tokens_and_logprobs_equal_tp1(cores) -> None:
    tp1, tp2 = cores
    prompts = _prompts(4)
    want = _run(tp1, prompts, return_logprob=True, top_logprobs_num=2)
    got = _run(tp2, prompts, return_logprob=True, top_logprobs_num=2)
    assert not tp2.overlap  # a follower cannot fill input ids from tokens pending on rank 0
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        assert g.output_logprobs == pytest.approx(w.output_logprobs, abs=TOL)


def test_tp2_core_prompt_logprobs_and_hidden_states_equal_tp1(cores) -> None:
    tp1, tp2 = cores
    prompts = _prompts(3)

    def extra() -> ExtraOutputs:
        return ExtraOutputs(return_hidden_states=True, logprob_start_len=0, top_logprobs_num=2)

    want = _run(tp1, prompts, outputs=extra)
    got = _run(tp2, prompts, outputs=extra)
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        n = len(g.prompt_ids)
        g_entries, w_entries = g.outputs.take_input_logprobs(n), w.outputs.take_input_logprobs(n)
        assert [e.token_id for e in g_entries] == [e.token_id for e in w_entries]
        for ge, we in zip(g_entries[1:], w_entries[1:]):
            assert ge.logprob == pytest.approx(we.logprob, abs=TOL)
            assert [t for t, _ in ge.top] == [t for t, _ in we.top]
        rows = n + len(g.output_ids) - 1
        torch.testing.assert_close(
            torch.tensor(g.outputs.take_hidden(rows)),
            torch.tensor(w.outputs.take_hidden(rows)),
            atol=TOL,
            rtol=0,
        )


def test_closing_a_tp2_core_stops_its_follower(tiny_llama: Path) -> None:
    core = _core(tiny_llama, 2)
    procs = list(core.tp_followers.procs)
    _run(core, _prompts(2))
    core.close()
    assert [p.returncode for p in procs] == [0]


def test_a_dead_follower_fails_the_next_step_naming_it(tiny_llama: Path) -> None:
    core = _core(tiny_llama, 2)
    follower = core.tp_followers.procs[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait(10)
    deadline = time.monotonic() + 10  # the watcher polls every 0.2 s
    while core.tp_followers.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    core.add(Request("x", [5, 6, 7], SamplingParams(max_new_tokens=2)))
    with pytest.raises(RuntimeError, match="tensor-parallel rank 1 exited"):
        core.step()
    core.close()
