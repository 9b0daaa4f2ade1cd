"""Qwen2.5-VL against transformers on its tiny model: the windowed vision tower (RMSNorm, gated
MLP, window and whole-image blocks) and greedy tokens with two images; the rest of the path is
Qwen2-VL's (tests/multimodal/test_qwen2_vl_model.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vlm_reference import chat_prompt, data_url, hf_greedy, random_image

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.processor import ImageProcessor
from pdserve.scheduler.request import Request
from pdserve.tiny_model.vlm import build_tiny_vlm
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 10


@pytest.fixture(scope="module")
def tiny_vlm25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(
        tmp_path_factory.mktemp("vlm25") / "qwen2_5_vl", seed=5, arch="qwen2_5_vl"
    )


@pytest.fixture(scope="module")
def hf_vlm25(tiny_vlm25: Path) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_vlm25, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def core(tiny_vlm25: Path) -> WorkerCore:
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=16)  # images split in chunks
    config = EngineConfig(
        model_path=str(tiny_vlm25), device="cpu", dtype="float32", scheduler=sched
    )
    return WorkerCore(config, overlap=False)


def test_windowed_vision_tower_matches_transformers(core: WorkerCore, hf_vlm25: Any) -> None:
    grids = [[1, 4, 6], [1, 10, 8], [2, 6, 6]]  # windows of 2 x 2 merged tokens, some partial
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=generator)
    with torch.no_grad():
        ours = core.runner.model.visual(pixels, grids)
        theirs = hf_vlm25.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_greedy_tokens_with_two_images_equal_transformers(
    tiny_vlm25: Path, core: WorkerCore, hf_vlm25: Any
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm25)
    processor = ImageProcessor.for_model(tiny_vlm25, tokenizer)
    assert processor is not None
    rng = np.random.default_rng(50)
    images = [random_image(rng, 140, 84), random_image(rng, 56, 112)]
    prompt = chat_prompt(tokenizer, "Compare the two.", 2)
    expected = hf_greedy(tiny_vlm25, hf_vlm25, tokenizer, prompt, images, NUM_NEW)
    loaded = processor.preprocess([data_url(im) for im in images])
    ids = tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0.0)
    req = Request(rid="qwen2.5", prompt_ids=ids, sampling=sampling)
    req.mm = processor.inputs(ids, loaded)
    core.add(req)
    while not req.is_finished:
        core.step()
    assert req.output_ids == expected
