"""The tokenizer process's part: chat image parts and `image_data` become a TokenizedReq whose
prompt holds each image's placeholder tokens and whose `mm` carries the pixels as raw bytes
(msgpack, no pickle); requests it cannot serve are refused with a message naming why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer
from vlm_reference import data_url, random_image

from pdserve import protocol
from pdserve.multimodal.processor import ImageProcessor
from pdserve.protocol import GenerateReq
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore

SAMPLING = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def core(tiny_vlm: Path, vlm_tokenizer: Any) -> TokenizerCore:
    core = TokenizerCore(vlm_tokenizer, idx=0, max_context_len=2048, num_workers=1)
    core.images = ImageProcessor.for_model(tiny_vlm, vlm_tokenizer)
    return core


def test_chat_image_parts_become_placeholder_tokens_and_pixels(
    core: TokenizerCore, vlm_tokenizer: Any
) -> None:
    rng = np.random.default_rng(0)
    pics = [random_image(rng, 56, 84), random_image(rng, 112, 56)]
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    req = GenerateReq(
        rid="mm-1",
        sampling=SAMPLING,
        messages=[{"role": "user", "content": content}],
        image_data=[data_url(p) for p in pics],
    )
    assert core.is_long(req)  # images are loaded off the event loop
    _, msg = core.on_generate(req)
    mm = msg.mm
    assert mm is not None and mm.image_grid_thw == [[1, 4, 6], [1, 8, 4]]
    assert mm.num_image_tokens == [6, 8]
    assert msg.input_ids.count(mm.image_token_id) == 14
    text = vlm_tokenizer.decode(msg.input_ids)
    assert text.count("<|vision_start|>") == 2 and "and" in text
    wire = protocol.decode(protocol.encode(msg))  # the codec carries the pixels as bytes
    assert wire.mm == mm
    restored = np.frombuffer(wire.mm.pixel_values, np.float32).reshape(wire.mm.pixel_shape)
    assert restored.shape == (sum(t * h * w for t, h, w in mm.image_grid_thw), 3 * 2 * 14 * 14)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"text": "two <|image_pad|><|image_pad|>"}, "2 image placeholders .* for 1 image"),
        ({"input_ids": [1, 2, 3]}, r"input_ids hold 0 image tokens \(\d+\) for 1 image"),
    ],
)
def test_requests_the_images_do_not_fit_are_refused(
    core: TokenizerCore, fields: dict[str, Any], error: str
) -> None:
    image = data_url(random_image(np.random.default_rng(1), 56, 56))
    req = GenerateReq(rid="bad", sampling=SAMPLING, image_data=[image], **fields)
    with pytest.raises(ValueError, match=error):
        core.on_generate(req)


def test_token_in_with_images_gets_the_ids_text_gets(
    core: TokenizerCore, vlm_tokenizer: Any
) -> None:
    """input_ids with one placeholder per image are expanded; already expanded ones (the
    processor's output) are kept: both give what the same text gives."""
    image = data_url(random_image(np.random.default_rng(3), 84, 56))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    _, from_text = core.on_generate(
        GenerateReq(rid="text", sampling=SAMPLING, text=text, image_data=[image])
    )
    short_ids = vlm_tokenizer.encode(text, add_special_tokens=False)
    for rid, ids in (("short", short_ids), ("expanded", from_text.input_ids)):
        req = GenerateReq(rid=rid, sampling=SAMPLING, input_ids=ids, image_data=[image])
        _, msg = core.on_generate(req)
        assert msg.input_ids == from_text.input_ids and msg.mm == from_text.mm


def test_a_text_only_model_refuses_images_by_name(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    core = TokenizerCore(tokenizer, idx=0, max_context_len=256, num_workers=1)
    image = data_url(random_image(np.random.default_rng(2), 56, 56))
    req = GenerateReq(rid="t", sampling=SAMPLING, text="hi", image_data=[image])
    with pytest.raises(ValueError, match="image_data: this model takes text only"):
        core.on_generate(req)
