"""Multimodal `/v1/embeddings` items -> gme's prompt: through the tiny Qwen2-VL's chat template the
router's messages render exactly the string gme's own inference code builds; a bad item is a 400
naming `input[i]` and its field."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.router.embedding_inputs import is_multimodal_input, multimodal_prompts
from pdserve.router.errors import APIError
from pdserve.tiny_model.vlm import build_tiny_vlm
from pdserve.tokenizer_proc.chat_template import render_chat


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_vlm(tmp_path_factory.mktemp("gme") / "m"))


def gme_inference_prompt(text: str | None, has_image: bool) -> str:
    """As gme_inference.py writes it (default instruction)."""
    content = ("<|vision_start|><|image_pad|><|vision_end|>" if has_image else "") + (text or "")
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    )


def test_items_render_gme_prompts_with_their_images(tokenizer: Any) -> None:
    items = [{"text": "a cat"}, {"image": "data:x"}, {"text": "a dog", "image": "/tmp/d.png"}]
    assert is_multimodal_input(items) and not is_multimodal_input(["a"])
    prompts, images = multimodal_prompts(items)
    rendered = [
        render_chat(tokenizer, p.messages, add_generation_prompt=False, continue_final_message=True)
        for p in prompts
    ]
    assert rendered == [
        gme_inference_prompt("a cat", False),
        gme_inference_prompt(None, True),
        gme_inference_prompt("a dog", True),
    ]
    assert images == [None, ["data:x"], ["/tmp/d.png"]]


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([{"text": "ok"}, {"image": 5}], "input[1].image"),
        ([{"text": 3}], "input[0].text"),
        ([{"image": ""}], "input[0].image"),
        ([{"text": "a", "video": "v.mp4"}], "input[0].video"),
        ([{}], "input[0]"),
        ([{"text": "a"}, "plain"], "input[1]"),
    ],
)
def test_a_bad_item_is_a_400_naming_it(items: list[Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        multimodal_prompts(items)
    assert err.value.status == 400 and err.value.param == param
