"""`Engine(in_process=True).generate(image_data=..., video_data=...)` on the tiny Qwen2-VL: greedy
tokens for one and two images (a batch, with a text-only prompt beside them) and for videos (a file;
frames after an image) equal transformers'; bad image or video data is a ValueError naming it, and
a text-only model refuses images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_reference import (
    chat_prompt,
    data_url,
    hf_greedy,
    media_prompt,
    qwen_reference,
    random_frames,
    random_image,
    video_data_url,
)

from pdserve.entrypoints.engine import Engine

NUM_NEW = 6
PARAMS = {"max_new_tokens": NUM_NEW, "min_new_tokens": NUM_NEW, "temperature": 0}


def test_in_process_engine_with_images_equals_transformers(
    tiny_vlm: Path, hf_vlm: Any, vlm_tokenizer: Any
) -> None:
    rng = np.random.default_rng()
    pics = [random_image(rng, 56, 84), random_image(rng, 84, 56)]
    prompts = [
        chat_prompt(vlm_tokenizer, "One picture.", 1),
        chat_prompt(vlm_tokenizer, "Two pictures.", 2),
        chat_prompt(vlm_tokenizer, "No picture.", 0),
    ]
    image_data = [data_url(pics[0]), [data_url(p) for p in pics], None]
    with Engine(str(tiny_vlm), in_process=True, device="cpu", num_pages=512, page_size=4) as eng:
        outs = eng.generate(prompts, PARAMS, image_data=image_data)
        with pytest.raises(ValueError, match="one entry per prompt"):
            eng.generate(prompts, PARAMS, image_data=[data_url(pics[0])])
        with pytest.raises(ValueError, match="image"):
            eng.generate(prompts[0], PARAMS, image_data="data:image/png;base64,AAAA")
    want = [
        hf_greedy(tiny_vlm, hf_vlm, vlm_tokenizer, prompts[0], pics[:1], NUM_NEW),
        hf_greedy(tiny_vlm, hf_vlm, vlm_tokenizer, prompts[1], pics, NUM_NEW),
        hf_greedy(tiny_vlm, hf_vlm, vlm_tokenizer, prompts[2], [], NUM_NEW),
    ]
    assert [o["output_ids"] for o in outs] == want


def test_a_text_only_model_refuses_images_in_process(tiny_llama: Path) -> None:
    with Engine(str(tiny_llama), in_process=True, device="cpu") as eng:
        with pytest.raises(ValueError, match="text only"):
            eng.generate("hi", PARAMS, image_data="data:image/png;base64,AAAA")


def test_in_process_engine_with_videos_equals_transformers(
    tiny_vlm: Path, hf_vlm: Any, vlm_tokenizer: Any
) -> None:
    """A video file alone, and an image then a video given as frames, in one batch."""
    rng = np.random.default_rng()
    clip, frames = random_frames(rng, 4, 56, 56), random_frames(rng, 2, 84, 56)
    pic = random_image(rng, 56, 84)
    prompts = [
        media_prompt(vlm_tokenizer, "A video.", ["video"]),
        media_prompt(vlm_tokenizer, "A picture, then a clip.", ["image", "video"]),
    ]
    frame_urls = [data_url(f) for f in frames]
    with Engine(str(tiny_vlm), in_process=True, device="cpu", num_pages=512, page_size=4) as eng:
        outs = eng.generate(
            prompts,
            PARAMS,
            image_data=[None, data_url(pic)],
            video_data=[video_data_url(clip), [frame_urls]],
        )
        with pytest.raises(ValueError, match="frames of one video must have one size"):
            eng.generate(prompts[0], PARAMS, video_data=[[data_url(pic), frame_urls[0]]])
    want = [
        qwen_reference(tiny_vlm, hf_vlm, vlm_tokenizer, prompts[0], [], clip, NUM_NEW),
        qwen_reference(tiny_vlm, hf_vlm, vlm_tokenizer, prompts[1], [pic], frames, NUM_NEW),
    ]
    assert [o["output_ids"] for o in outs] == want
