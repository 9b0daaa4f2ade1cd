"""pdserve's Qwen2-VL against transformers' on the tiny model: the vision tower, M-RoPE positions,
greedy tokens with one and two images (whole and chunked prefill, overlapped and plain loop), the
prefix cache keyed by image and the encoder cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vlm_reference import chat_prompt, data_url, hf_greedy, random_image

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.sampling_params import SamplingParams
from pdserve.multimodal.mrope import mrope_positions
from pdserve.multimodal.processor import ImageProcessor
from pdserve.scheduler.request import Request
from pdserve.worker.worker_core import WorkerCore

NUM_NEW = 10


def make_core(
    path: Path, chunk_size: int = 4096, overlap: bool = False, num_pages: int = 256
) -> WorkerCore:
    sched = SchedulerConfig(num_pages=num_pages, page_size=4, chunk_size=chunk_size)
    config = EngineConfig(model_path=str(path), device="cpu", dtype="float32", scheduler=sched)
    return WorkerCore(config, overlap=overlap)


@pytest.fixture(scope="module")
def core(tiny_vlm: Path) -> WorkerCore:
    return make_core(tiny_vlm)


@pytest.fixture(scope="module")
def processor(tiny_vlm: Path, vlm_tokenizer: Any) -> ImageProcessor:
    found = ImageProcessor.for_model(tiny_vlm, vlm_tokenizer)
    assert found is not None
    return found


def pd_request(
    processor: ImageProcessor,
    tokenizer: Any,
    prompt: str,
    images: list[Any],
    rid: str,
    num_new: int = NUM_NEW,
) -> Request:
    """What the tokenizer process makes of a prompt and images, as the worker's Request."""
    loaded = processor.preprocess([data_url(im) for im in images])
    ids = tokenizer.encode(processor.expand(prompt, loaded), add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=num_new, min_new_tokens=num_new, temperature=0.0)
    req = Request(rid=rid, prompt_ids=ids, sampling=sampling)
    req.mm = processor.inputs(ids, loaded)
    return req


def run(core: WorkerCore, *reqs: Request) -> None:
    for req in reqs:
        core.add(req)
    while not all(r.is_finished for r in reqs):
        core.step()


def test_vision_tower_matches_transformers(core: WorkerCore, hf_vlm: Any) -> None:
    grids = [[1, 4, 6], [1, 8, 4], [2, 2, 2]]  # the last: a 2-frame clip's grid
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=generator)
    with torch.no_grad():
        ours = core.runner.model.visual(pixels, grids)
        theirs = hf_vlm.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    assert ours.shape == theirs.shape == (sum(t * h * w for t, h, w in grids) // 4, 64)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_mrope_positions_match_transformers_rope_index(hf_vlm: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image_id = hf_vlm.config.image_token_id
    ids: list[int] = []
    grids = []
    for _ in range(int(rng.integers(1, 4))):
        ids += rng.integers(0, 500, int(rng.integers(1, 6))).tolist()  # text between images
        grid = [1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))]
        grids.append(grid)
        ids += [image_id] * (grid[1] * grid[2] // 4)
    ids += rng.integers(0, 500, int(rng.integers(1, 6))).tolist()
    ours = mrope_positions(ids, image_id, grids, 2)
    input_ids = torch.tensor([ids])
    types = (input_ids == image_id).int()
    theirs, delta = hf_vlm.model.get_rope_index(input_ids, types, torch.tensor(grids))
    np.testing.assert_array_equal(ours.positions, theirs[:, 0].numpy())
    assert ours.delta == int(delta)


def test_mrope_positions_refuse_image_tokens_that_do_not_match_the_grids() -> None:
    with pytest.raises(ValueError, match="holds 3 image tokens: expected 4"):
        mrope_positions([1, 9, 9, 9, 2], 9, [[1, 4, 4]], 2)


@pytest.mark.parametrize(
    ("num_images", "chunk_size", "overlap"),
    [(1, 4096, False), (2, 4096, True), (2, 7, False)],
    ids=["one-image", "two-images-overlapped", "two-images-chunked"],
)
def test_greedy_tokens_equal_transformers(
    tiny_vlm: Path,
    core: WorkerCore,
    hf_vlm: Any,
    vlm_tokenizer: Any,
    processor: ImageProcessor,
    num_images: int,
    chunk_size: int,
    overlap: bool,
) -> None:
    rng = np.random.default_rng(10 + num_images)
    images = [random_image(rng, 56 + 14 * i, 90 - 14 * i) for i in range(num_images)]
    prompt = chat_prompt(vlm_tokenizer, "Describe the picture.", num_images)
    expected = hf_greedy(tiny_vlm, hf_vlm, vlm_tokenizer, prompt, images, NUM_NEW)
    worker = (
        core if chunk_size == 4096 and not overlap else make_core(tiny_vlm, chunk_size, overlap)
    )
    req = pd_request(processor, vlm_tokenizer, prompt, images, f"greedy-{num_images}-{chunk_size}")
    run(worker, req)
    assert req.output_ids == expected


def test_text_only_prompt_on_the_vlm_equals_transformers(
    tiny_vlm: Path, core: WorkerCore, hf_vlm: Any, vlm_tokenizer: Any
) -> None:
    prompt = chat_prompt(vlm_tokenizer, "No picture this time.", 0)
    expected = hf_greedy(tiny_vlm, hf_vlm, vlm_tokenizer, prompt, [], NUM_NEW)
    ids = vlm_tokenizer.encode(prompt, add_special_tokens=False)
    sampling = SamplingParams(max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW, temperature=0.0)
    req = Request(rid="text-only", prompt_ids=ids, sampling=sampling)
    run(core, req)
    assert req.output_ids == expected


def test_same_image_is_a_prefix_hit_and_a_different_image_is_not(
    core: WorkerCore, vlm_tokenizer: Any, processor: ImageProcessor
) -> None:
    rng = np.random.default_rng(20)
    image, other = random_image(rng, 84, 84), random_image(rng, 84, 84)
    prompt = chat_prompt(vlm_tokenizer, "Same text each time, a long enough question.", 1)
    first = pd_request(processor, vlm_tokenizer, prompt, [image], "cache-first")
    run(core, first)
    again = pd_request(processor, vlm_tokenizer, prompt, [image], "cache-again")
    run(core, again)
    different = pd_request(processor, vlm_tokenizer, prompt, [other], "cache-other")
    run(core, different)
    image_start = first.prompt_ids.index(first.mm.image_token_id)
    assert again.num_cached_tokens >= len(first.prompt_ids) - 4  # all but the last page
    assert again.output_ids == first.output_ids
    assert different.prompt_ids == first.prompt_ids  # same token ids: only the image differs
    assert different.num_cached_tokens <= image_start  # nothing past the image's first token
    assert different.output_ids != first.output_ids


def test_encoder_cache_skips_the_vision_tower_for_a_known_image(
    core: WorkerCore, vlm_tokenizer: Any, processor: ImageProcessor, monkeypatch: Any
) -> None:
    model = core.runner.model
    calls: list[list[list[int]]] = []
    encode = model.visual.forward
    monkeypatch.setattr(
        model.visual, "forward", lambda px, grids: calls.append(grids) or encode(px, grids)
    )
    image = random_image(np.random.default_rng(30), 56, 112)
    # Different text before the image: no prefix is shared, the image rows are computed twice.
    a = pd_request(processor, vlm_tokenizer, chat_prompt(vlm_tokenizer, "A", 1), [image], "enc-a")
    b_prompt = "<|im_start|>system\nBe brief.<|im_end|>\n" + chat_prompt(vlm_tokenizer, "B", 1)
    b = pd_request(processor, vlm_tokenizer, b_prompt, [image], "enc-b")
    run(core, a)
    run(core, b)
    assert calls == [a.mm.image_grid_thw]  # encoded once, for the first request
    assert model.encoder_cache.num_hits >= 1


def test_preempted_requests_recompute_their_images_and_give_the_same_tokens(
    tiny_vlm: Path, core: WorkerCore, vlm_tokenizer: Any, processor: ImageProcessor
) -> None:
    """Four requests with an image each in a pool too small for all their decodes: some are
    preempted and recomputed from the prompt (images included) and still give the tokens each
    gives alone."""
    rng = np.random.default_rng(40)
    pics = [random_image(rng, 56, 84) for _ in range(4)]
    prompts = [chat_prompt(vlm_tokenizer, f"Question number {i}?", 1) for i in range(4)]

    def requests(tag: str) -> list[Request]:
        return [
            pd_request(processor, vlm_tokenizer, p, [im], f"{tag}-{i}", num_new=24)
            for i, (p, im) in enumerate(zip(prompts, pics))
        ]

    alone = requests("alone")
    for req in alone:
        run(core, req)
    small = make_core(tiny_vlm, num_pages=36)
    crowded = requests("crowded")
    run(small, *crowded)
    assert small.scheduler.num_preemptions > 0, "the pool was not small enough"
    assert [r.output_ids for r in crowded] == [r.output_ids for r in alone]
