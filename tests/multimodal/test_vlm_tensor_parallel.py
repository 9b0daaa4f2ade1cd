"""Vision-language models under tensor parallelism on CPU (gloo; rank 0 here, rank 1 a follower
process): rank 0 runs the vision tower and broadcasts the step's image rows (and Qwen2-VL's
M-RoPE positions) after the batch, so the followers' decoder shards take the same input. Greedy
tokens equal a tp 1 core's, for Qwen2-VL, LLaVA-NeXT with a Qwen2 decoder and Mistral 3, with
one and two images of fresh random pixels and a text-only request in the same batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from vlm_reference import image_requests, run_to_end

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.tiny_model.llava import build_tiny_llava_next, build_tiny_pixtral
from pdserve.tiny_model.vlm import build_tiny_vlm
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 5
BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_tiny_vlm,
    "llava_next_qwen2": functools.partial(build_tiny_llava_next, decoder="qwen2"),
    "mistral3": functools.partial(build_tiny_pixtral, mistral3=True),
}


def _core(path: Path, tp_size: int) -> WorkerCore:
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=7)  # images split over chunks
    config = EngineConfig(
        model_path=str(path), device="cpu", dtype="float32", scheduler=sched, tp_size=tp_size
    )
    return WorkerCore(config, overlap=False)


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp("tp_vlm") / request.param, seed=5)


@pytest.fixture(scope="module")
def cores(model: Path) -> Iterator[tuple[WorkerCore, WorkerCore]]:
    tp2 = _core(model, 2)
    yield _core(model, 1), tp2
    tp2.close()


def _requests(model: Path, seed: int) -> list[Request]:
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0)
    return image_requests(
        model, seed, sampling, "What is it?", [[(40, 60)], [(56, 30), (30, 44)], []]
    )


def test_tp2_greedy_tokens_with_images_equal_tp1(model: Path, cores) -> None:
    tp1, tp2 = cores
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh pixels each run
    want = run_to_end(tp1, _requests(model, seed), 300)
    got = run_to_end(tp2, _requests(model, seed), 300)
    assert got == want, seed
