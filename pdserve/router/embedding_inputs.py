"""Multimodal `/v1/embeddings` inputs (gme-Qwen2-VL style, SGLang's `multimodal_embedding.py`):
`input: [{"text": ...}, {"image": ...}, {"text": ..., "image": ...}]`, one vector per item.

Each item becomes the prompt gme's own inference code embeds: a system turn with the default
instruction, a user turn holding the image placeholder (when there is an image) then the text,
and an open assistant turn holding `<|endoftext|>`, whose hidden state is pooled (last token).
The router sends it as chat messages (the tokenizer process renders them with the model's chat
template, which places the image placeholder) with the image as the request's `image_data`.
"""

from __future__ import annotations

from typing import Any

from pdserve.router.errors import bad_request
from pdserve.router.openai_serving import Prompt

GME_INSTRUCTION = "You are a helpful assistant."
GME_END = "<|endoftext|>"  # the token whose final hidden state is the embedding
_KEYS = frozenset({"text", "image"})


def is_multimodal_input(value: Any) -> bool:
    """Whether `/v1/embeddings`' input is a list of {"text", "image"} items."""
    return isinstance(value, list) and bool(value) and any(isinstance(v, dict) for v in value)


def multimodal_prompts(value: list[Any]) -> tuple[list[Prompt], list[list[str] | None]]:
    """The chat prompt and the images of each item; a 400 naming the bad item and field."""
    prompts, images = [], []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(
                f"{where} must be an object like {{'text': str, 'image': str}} (every item of "
                "a multimodal input is one)", where
            )  # fmt: skip
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise bad_request(f"{where} has unknown field(s) {unknown}: expected 'text' and/or "
                              "'image'", f"{where}.{unknown[0]}")  # fmt: skip
        text, image = item.get("text"), item.get("image")
        if text is None and image is None:
            raise bad_request(f"{where} needs 'text', 'image' or both", where)
        if text is not None and not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string, got {type(text).__name__}",
                              f"{where}.text")  # fmt: skip
        if image is not None and (not isinstance(image, str) or not image):
            raise bad_request(
                f"{where}.image must be a non-empty string (a URL, a path or base64 data), got "
                f"{type(image).__name__}", f"{where}.image"
            )  # fmt: skip
        prompts.append(Prompt(messages=gme_messages(text, image is not None)))
        images.append([image] if image is not None else None)
    return prompts, images


def gme_messages(text: str | None, has_image: bool) -> list[dict[str, Any]]:
    """gme's prompt as chat messages, the assistant turn left open (continue_final_message)."""
    parts: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
    if text or not has_image:
        parts.append({"type": "text", "text": text or ""})
    return [
        {"role": "system", "content": GME_INSTRUCTION},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": GME_END},
    ]
