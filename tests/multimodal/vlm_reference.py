"""Generated images and transformers' own greedy output for the tiny Qwen2-VL (the reference the
multimodal tests compare pdserve with)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_PAD = "<|image_pad|>"


def random_image(rng: np.random.Generator, height: int, width: int) -> Any:
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def chat_prompt(tokenizer: Any, text: str, num_images: int) -> str:
    """A user turn with `num_images` image parts before `text`, through the chat template."""
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def hf_greedy(
    model_path: Path, model: Any, tokenizer: Any, prompt: str, images: list[Any], num_new: int
) -> list[int]:
    """transformers' greedy tokens for `prompt` (one placeholder per image) and `images`: its
    image processor, the Qwen2-VL processor's placeholder expansion, `generate`."""
    from transformers import AutoImageProcessor

    inputs: dict[str, Any] = {"image_grid_thw": []}
    if images:
        processor = AutoImageProcessor.from_pretrained(model_path, backend="pil")
        inputs = processor(images=images, return_tensors="pt")
    pieces = prompt.split(IMAGE_PAD)
    assert len(pieces) == len(images) + 1
    text = pieces[0]
    for grid, piece in zip(inputs["image_grid_thw"], pieces[1:]):
        text += IMAGE_PAD * (int(grid.prod()) // 4) + piece
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == model.config.image_token_id).int(),
        **inputs if images else {},
        max_new_tokens=num_new,
        min_new_tokens=num_new,
        do_sample=False,
    )
    return out[0, ids.shape[1] :].tolist()
