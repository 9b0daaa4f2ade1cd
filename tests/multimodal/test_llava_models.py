"""LLaVA-OneVision, LLaVA-NeXT and Pixtral against transformers on their tiny models: greedy tokens for one
image of several shapes (tiled at different resolutions) and for two images (OneVision: one tile
each; NeXT: tiled too), with chunked prefill;
the token count the tokenizer computes and the feature packing (including the shrinking beyond
`max_num_tiles`) against transformers' own functions."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vlm_reference import data_url, random_image

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.llava_processing import best_resolution, num_image_tokens
from pdserve.multimodal.processor import ImageProcessor
from pdserve.scheduler.request import Request
from pdserve.tiny_model.llava import (
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_pixtral,
)
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 8


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("llava") / "llava_ov", seed=7)


@pytest.fixture(scope="module")
def hf_llava(tiny_llava: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llava: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llava)


@pytest.fixture(scope="module")
def core(tiny_llava: Path) -> WorkerCore:
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=9)  # images split in chunks
    config = EngineConfig(
        model_path=str(tiny_llava), device="cpu", dtype="float32", scheduler=sched
    )
    return WorkerCore(config, overlap=False)


def hf_greedy(model: Any, ids: list[int], loaded: Any) -> list[int]:
    """transformers' tokens; `loaded`: the tokenizer process's Images (tiles [n, 3, S, S])."""
    input_ids = torch.tensor([ids])
    per_image = torch.from_numpy(loaded.pixel_values).split(loaded.num_patches)
    most = max(loaded.num_patches)  # [images, tiles, 3, S, S], padded as transformers' processor
    tiles = torch.stack(
        [torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])]) for t in per_image]
    )
    extra = {}
    if "Onevision" in type(model).__name__:
        extra["batch_num_images"] = torch.tensor([len(loaded.image_sizes)])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=tiles,
        image_sizes=torch.tensor(loaded.image_sizes),
        **extra,
        max_new_tokens=NUM_NEW,
        min_new_tokens=NUM_NEW,
        do_sample=False,
    )
    return out[0, len(ids) :].tolist()


SIZES = [[(40, 70)], [(90, 30)], [(120, 200)], [(300, 300)], [(40, 70), (50, 30)]]
SIZE_IDS = ["wide", "tall", "large", "square", "two-images"]


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_greedy_tokens_equal_transformers(
    tiny_llava: Path, core: WorkerCore, hf_llava: Any, tokenizer: Any, sizes: list[tuple[int, int]]
) -> None:
    run_and_compare(tiny_llava, core, hf_llava, tokenizer, sizes)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_next(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llava_next") / f"llava_next_{request.param}"
    return build_tiny_llava_next(out, seed=9, decoder=request.param)


@pytest.mark.parametrize("sizes", [SIZES[0], SIZES[2], SIZES[4]], ids=["wide", "large", "two"])
def test_llava_next_greedy_tokens_equal_transformers(
    tiny_next: Path, sizes: list[tuple[int, int]]
) -> None:
    """LLaVA-NeXT: a CLIP tower (CLS dropped, the second to last layer) and a Llama decoder, or
    a Qwen2 one (LLaVA-NeXT-72B and 110B, SGLang's qwen_llava example)."""
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration

    hf = LlavaNextForConditionalGeneration.from_pretrained(tiny_next, dtype=torch.float32).eval()
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=9)
    config = EngineConfig(model_path=str(tiny_next), device="cpu", dtype="float32", scheduler=sched)
    core = WorkerCore(config, overlap=False)
    run_and_compare(tiny_next, core, hf, AutoTokenizer.from_pretrained(tiny_next), sizes)


def run_and_compare(
    path: Path, core: WorkerCore, hf: Any, tokenizer: Any, sizes: list[tuple[int, int]]
) -> None:
    processor = ImageProcessor.for_model(path, tokenizer)
    assert processor is not None
    rng = np.random.default_rng(sum(h * w for h, w in sizes))
    images = [random_image(rng, h, w) for h, w in sizes]
    parts = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is it?"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    loaded = processor.preprocess([data_url(im) for im in images])
    ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
    expected = hf_greedy(hf, ids, loaded)
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0.0)
    req = Request(rid=f"llava-{sizes}", prompt_ids=ids, sampling=sampling)
    req.mm = processor.inputs(ids, loaded)
    core.add(req)
    while not req.is_finished:
        core.step()
    assert req.output_ids == expected


@pytest.mark.parametrize("max_tiles", [9, 1])
def test_token_counts_and_packing_match_transformers(
    core: WorkerCore, hf_llava: Any, max_tiles: int
) -> None:
    """With max_tiles 1 most images are shrunk (bilinear) before their newline column."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor,
    )

    model = core.runner.model
    vision = dataclasses.replace(model.vision, max_num_tiles=max_tiles)
    pinpoints = [list(p) for p in vision.grid_pinpoints]
    hf_processor = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        num_image_tokens=4,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    hf_processor._get_unpadded_features = types.MethodType(
        LlavaOnevisionProcessor._get_unpadded_features, hf_processor
    )
    rng = np.random.default_rng(max_tiles)
    original = model.vision
    model.vision = vision
    try:
        for _ in range(12):
            size = (int(rng.integers(10, 400)), int(rng.integers(10, 400)))
            assert best_resolution(size, vision.grid_pinpoints) == select_best_resolution(
                size, pinpoints
            )
            expected = LlavaOnevisionProcessor._get_number_of_features(hf_processor, *size, 28, 28)
            assert num_image_tokens(size, vision, is_multi=False) == expected
            rows, cols = (r // 28 for r in best_resolution(size, vision.grid_pinpoints))
            features = torch.randn(rows * cols + 1, 4, 64)
            ours = model._pack(features, size, is_multi=False)
            theirs, _ = hf_llava.model.pack_image_features(
                [features], torch.tensor([size]), model.image_newline, f"anyres_max_{max_tiles}"
            )
            assert ours.shape[0] == expected
            torch.testing.assert_close(ours, theirs[0])
    finally:
        model.vision = original


def test_same_image_is_a_prefix_hit_and_a_different_image_is_not(
    tiny_llava: Path, core: WorkerCore, tokenizer: Any
) -> None:
    processor = ImageProcessor.for_model(tiny_llava, tokenizer)
    assert processor is not None
    rng = np.random.default_rng(99)
    image, other = random_image(rng, 60, 100), random_image(rng, 60, 100)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Again?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )

    def request(pic: Any, rid: str) -> Request:
        loaded = processor.preprocess([data_url(pic)])
        ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
        sampling = SamplingParams(max_new_tokens=4, min_new_tokens=4, temperature=0.0)
        req = Request(rid=rid, prompt_ids=ids, sampling=sampling)
        req.mm = processor.inputs(ids, loaded)
        core.add(req)
        while not req.is_finished:
            core.step()
        return req

    first, again, different = request(image, "a"), request(image, "b"), request(other, "c")
    assert again.num_cached_tokens >= len(first.prompt_ids) - 4
    assert again.output_ids == first.output_ids
    assert different.prompt_ids == first.prompt_ids
    assert different.num_cached_tokens <= first.prompt_ids.index(first.mm.image_token_id)


@pytest.fixture(scope="module", params=["pixtral", "mistral3"])
def tiny_pixtral(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pixtral, and Mistral 3 (the same tower; a projector that merges 2 x 2 patches)."""
    out = tmp_path_factory.mktemp("pixtral") / request.param
    return build_tiny_pixtral(out, seed=11, mistral3=request.param == "mistral3")


@pytest.mark.parametrize(
    "sizes", [[(40, 70)], [(200, 90)], [(40, 70), (150, 150)]], ids=["wide", "tall", "two"]
)
def test_pixtral_greedy_tokens_equal_transformers(
    tiny_pixtral: Path, sizes: list[tuple[int, int]]
) -> None:
    """Pixtral: each image at its own resolution, `[IMG_BREAK]` after each patch row and
    `[IMG_END]` last, 2-D RoPE in the tower; chunked prefill splits the images. Mistral 3: a
    token per 2 x 2 block of patches (an odd patch row or column is left out)."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pixtral)
    processor = ImageProcessor.for_model(tiny_pixtral, tokenizer)
    assert processor is not None
    arch = json.loads((tiny_pixtral / "config.json").read_text())["architectures"][0]
    hf = getattr(transformers, arch).from_pretrained(tiny_pixtral, dtype=torch.float32).eval()
    merge = 2 if arch == "Mistral3ForConditionalGeneration" else 1
    sched = SchedulerConfig(num_pages=256, page_size=4, chunk_size=9)
    config = EngineConfig(
        model_path=str(tiny_pixtral), device="cpu", dtype="float32", scheduler=sched
    )
    core = WorkerCore(config, overlap=False)
    rng = np.random.default_rng(sum(h * w for h, w in sizes))
    images = [random_image(rng, h, w) for h, w in sizes]
    parts = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What?"}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    loaded = processor.preprocess([data_url(im) for im in images])
    ids = tokenizer.encode(processor.expand(text, loaded), add_special_tokens=False)
    rows = loaded.image_sizes[0][0] // (14 * merge)
    assert ids.count(tokenizer.convert_tokens_to_ids("[IMG_BREAK]")) >= rows - 1
    # transformers' layout: the images padded to the largest, [n, 3, H, W]
    height = max(h for h, _ in loaded.image_sizes)
    width = max(w for _, w in loaded.image_sizes)
    flat, padded, start = (
        torch.from_numpy(loaded.pixel_values),
        torch.zeros(len(images), 3, height, width),
        0,
    )
    for k, (h, w) in enumerate(loaded.image_sizes):
        padded[k, :, :h, :w] = flat[start : start + 3 * h * w].view(3, h, w)
        start += 3 * h * w
    input_ids = torch.tensor([ids])
    out = hf.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=padded,
        image_sizes=torch.tensor(loaded.image_sizes),
        max_new_tokens=NUM_NEW,
        min_new_tokens=NUM_NEW,
        do_sample=False,
    )
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0.0)
    req = Request(rid=f"pixtral-{sizes}", prompt_ids=ids, sampling=sampling)
    req.mm = processor.inputs(ids, loaded)
    core.add(req)
    while not req.is_finished:
        core.step()
    assert req.output_ids == out[0, len(ids) :].tolist()
