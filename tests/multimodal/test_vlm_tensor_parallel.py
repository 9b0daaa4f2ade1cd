"""Vision-language models under tensor parallelism on CPU (gloo; rank 0 here, rank 1 a follower
process): rank 0 runs the vision tower and broadcasts the step's image rows (and Qwen2-VL's
M-RoPE positions) after the batch, so the followers' decoder shards take the same input. Greedy
tokens equal a tp 1 core's, for Qwen2-VL, LLaVA-NeXT with a Qwen2 decoder and Mistral 3, with
one and two images of fresh random pixels and a text-only request in the same batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer
from vlm_reference import data_url, random_image

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.processor import ImageProcessor
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
    tokenizer = AutoTokenizer.from_pretrained(model)
    processor = ImageProcessor.for_model(model, tokenizer)
    assert processor is not None
    rng = np.random.default_rng(seed)
    reqs = []
    for k, sizes in enumerate([[(40, 60)], [(56, 30), (30, 44)], []]):
        parts: list[dict[str, Any]] = [{"type": "image"}] * len(sizes)
        parts.append({"type": "text", "text": f"What is it? {k}"})
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
        )
        sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0)
        if not sizes:
            ids = tokenizer.encode(text, add_special_tokens=False)
            reqs.append(Request(f"r{k}", ids, sampling))
            continue
        loaded = processor.preprocess([data_url(random_image(rng, h, w)) for h, w in sizes])
        ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
        req = Request(f"r{k}", ids, sampling)
        req.mm = processor.inputs(ids, loaded)
        reqs.append(req)
    return reqs


def _run(core: WorkerCore, reqs: list[Request]) -> list[list[int]]:
    for req in reqs:
        core.add(req)
    for _ in range(300):
        if not core.has_work():
            break
        core.step()
    assert all(r.finish is not None and not r.finish.is_abort for r in reqs)
    return [r.output_ids for r in reqs]


def test_tp2_greedy_tokens_with_images_equal_tp1(model: Path, cores) -> None:
    tp1, tp2 = cores
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh pixels each run
    want = _run(tp1, _requests(model, seed))
    got = _run(tp2, _requests(model, seed))
    assert got == want, seed
