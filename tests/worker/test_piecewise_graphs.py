"""Piecewise graphs (worker/piecewise_graphs.py) on the CPU: the segments run eagerly on the same
static buffers, padding and order as the captured graphs replay them (capture and replay
themselves: test_piecewise_graphs_gpu.py). A core whose steps go through them gives the plain
core's tokens, logprobs and finishes for a random mix of requests (chunked prefills, mixed steps,
prefix reuse, arrivals mid-run), and leaves the same KV cache on every page but page 0, where
padding rows write."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.config.engine_config import EngineConfig
from pdserve.worker.piecewise_graphs import PiecewiseGraphRunner, build_piecewise, token_buckets
from pdserve.worker.worker_core import WorkerCore
from tests.worker.test_overlap import KINDS, assert_same, make_core, random_requests, run


def test_token_buckets() -> None:
    assert token_buckets(1) == [1]
    assert token_buckets(20) == [8, 16, 20]
    assert token_buckets(512) == [
        8,
        16,
        32,
        48,
        64,
        96,
        128,
        160,
        192,
        224,
        256,
        320,
        384,
        448,
        512,
    ]
    big = token_buckets(3000)
    assert big[-1] == 3000 and big == sorted(set(big))
    assert [b for b in big if 512 < b <= 2048] == list(range(640, 2049, 128))
    assert [b for b in big if b > 2048] == [2304, 2560, 2816, 3000]
    with pytest.raises(ValueError, match="piecewise_graph_max_tokens must be >= 1, got 0"):
        token_buckets(0)


def test_config_refuses_a_negative_token_bound() -> None:
    with pytest.raises(ValueError, match="piecewise_graph_max_tokens=-1 is invalid"):
        EngineConfig(model_path="m", piecewise_graph_max_tokens=-1)
    alias = EngineConfig.from_options("m", piecewise_cuda_graph_max_tokens=64)  # SGLang's name
    assert alias.piecewise_graph_max_tokens == 64


def _with_piecewise(core: WorkerCore, max_tokens: int) -> PiecewiseGraphRunner:
    runner = core.runner
    assert runner.piecewise is None  # no CUDA here: the runner never builds one itself
    runner.piecewise = PiecewiseGraphRunner(runner, max_tokens, capture=False)
    return runner.piecewise


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_segments_give_the_plain_forwards_tokens_and_kv(
    tiny_models: dict[str, Path], arch: str
) -> None:
    seed = random.randrange(2**32)
    specs = random_requests(random.Random(seed), 20, KINDS, logprobs=0.1)
    plain_core = make_core(tiny_models[arch], overlap=True)
    plain = run(plain_core, specs)
    core = make_core(tiny_models[arch], overlap=True)
    # 40 tokens: most steps fit a bucket (padded, mostly), the largest run eagerly.
    piecewise = _with_piecewise(core, 40)
    sizes: list[int] = []
    run_segments = piecewise.run

    def counting(fb):  # type: ignore[no-untyped-def]
        sizes.append(fb.num_tokens)
        return run_segments(fb)

    piecewise.run = counting  # type: ignore[method-assign]
    assert_same(plain, run(core, specs), seed)
    assert piecewise.num_runs == len(sizes) > 0
    buckets = {piecewise.bucket(n) for n in sizes}
    assert len(buckets) >= 3, f"seed {seed}: steps of {sorted(set(sizes))} tokens"
    assert any(n not in piecewise.buckets for n in sizes), "no step was padded"
    pools = plain_core.runner.kv_pool, core.runner.kv_pool
    for layer in range(core.model_config.num_layers):
        for a, b in (
            (pools[0].k(layer), pools[1].k(layer)),
            (pools[0].v(layer), pools[1].v(layer)),
        ):
            torch.testing.assert_close(a[1:], b[1:], rtol=1e-5, atol=1e-5)  # page 0: padding's


def test_a_shorter_step_after_a_longer_one_pads_with_slot_zero(tiny_llama: Path) -> None:
    """Rows past a step's tokens keep an earlier step's inputs; their KV slots must be 0."""
    core = make_core(tiny_llama, overlap=False)
    piecewise = _with_piecewise(core, 32)
    slots = piecewise.slots
    spec = {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    specs = [
        {
            "rid": "long",
            "prompt": list(range(5, 29)),
            "params": spec,
            "logprobs": False,
            "arrive": 0,
        },
        {"rid": "short", "prompt": [7, 8, 9], "params": spec, "logprobs": False, "arrive": 3},
    ]
    seen: list[tuple[int, list[int]]] = []
    run_segments = piecewise.run

    def watching(fb):  # type: ignore[no-untyped-def]
        out = run_segments(fb)
        seen.append((fb.num_tokens, slots.tolist()))
        return out

    piecewise.run = watching  # type: ignore[method-assign]
    run(core, specs)
    assert len(seen) >= 3
    for num_tokens, row_slots in seen:
        assert all(s == 0 for s in row_slots[num_tokens:]), (num_tokens, row_slots)
        assert all(s != 0 for s in row_slots[:num_tokens])


def test_running_out_of_memory_in_capture_leaves_the_steps_eager(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    core = make_core(tiny_llama, overlap=False)

    def no_memory(self: PiecewiseGraphRunner) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PiecewiseGraphRunner, "_capture", no_memory)
    assert build_piecewise(core.runner, 64) is None
    assert "piecewise CUDA graphs off" in caplog.text and "2.00 GiB" in caplog.text
    assert build_piecewise(core.runner, 64, capture=False) is not None
    monkeypatch.setattr(PiecewiseGraphRunner, "_capture", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: it is not swallowed
        build_piecewise(core.runner, 64)
