"""Tiny random-weight vision-language model directories (Qwen2-VL, Qwen2.5-VL), offline.

The directory is what a published Qwen2-VL checkpoint holds, shrunk: tokenizer (the tiny BPE of
`build.py` plus Qwen2-VL's vision tokens, a chat template that renders image parts), a flat
`config.json` (`rope_scaling.mrope_section`), `preprocessor_config.json` for transformers'
Qwen2-VL image processor (small pixel bounds, so an image is a few tokens), and random float32
weights under the published names (`model.layers.*`, `visual.*`). transformers' `AutoProcessor`
and `Qwen2VLForConditionalGeneration` load it as-is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdserve.tiny_model.build import (
    ENDOFTEXT,
    IM_END,
    TINY_SHAPES,
    generation_config,
    random_weights,
    train_tokenizer,
    write_json,
    write_tokenizer,
)

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# ChatML with Qwen2-VL's rendering of image and video parts.
VLM_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A 14-pixel patch, 2x2 patches merged into one token: an image of 56x56 pixels is 4 tokens.
PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112  # at most 16 tokens per image
TINY_VISION: dict[str, Any] = {
    "depth": 2,
    "embed_dim": 32,
    "hidden_size": TINY_SHAPES["hidden_size"],  # the merger's output: the decoder's width
    "hidden_act": "quick_gelu",
    "mlp_ratio": 2,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": 2,
}
# Qwen2.5-VL's tower: RMSNorm, gated MLP, windows of 56 pixels (2 x 2 merged tokens), the
# second block over the whole image.
TINY_VISION_2_5: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "out_hidden_size": TINY_SHAPES["hidden_size"],
    "hidden_act": "silu",
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": 2,
    "window_size": 56,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
VLM_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", TINY_VISION),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", TINY_VISION_2_5),
}
# head_dim 16: 8 rotary frequencies, split over (temporal, height, width).
MROPE_SECTION = [2, 3, 3]
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_vlm(
    out_dir: str | Path, seed: int = 0, vocab_size: int = 512, arch: str = "qwen2_vl"
) -> Path:
    """Write a tiny Qwen2-VL (arch "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") directory into
    `out_dir`; returns it as a Path."""
    if arch not in VLM_ARCHS:
        raise ValueError(f"arch={arch!r} is not supported: expected one of {sorted(VLM_ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.add_special_tokens(list(VISION_TOKENS))
    write_tokenizer(tokenizer, out)
    _add_vision_tokens(out, {t: tokenizer.token_to_id(t) for t in VISION_TOKENS})
    ids = {t: tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_END, *VISION_TOKENS)}
    config = _hf_config(tokenizer.get_vocab_size(with_added_tokens=True), ids, arch)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(config))
    write_json(out / "preprocessor_config.json", _preprocessor_config())
    _write_weights(out, seed, arch)
    return out


def _add_vision_tokens(out: Path, token_ids: dict[str, int]) -> None:
    """Mark the vision tokens special in tokenizer_config.json and use the VLM chat template."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for token, tid in token_ids.items():
        config["added_tokens_decoder"][str(tid)] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    config["additional_special_tokens"] += list(VISION_TOKENS)
    config["chat_template"] = VLM_CHAT_TEMPLATE
    config["processor_class"] = "Qwen2VLProcessor"
    write_json(path, config)


def _hf_config(vocab_size: int, ids: dict[str, int], arch: str) -> dict[str, Any]:
    """A flat config.json, as the published Qwen2-VL checkpoints have it."""
    architecture, vision = VLM_ARCHS[arch]
    return {
        "architectures": [architecture],
        "model_type": arch,
        **TINY_SHAPES,
        "vocab_size": vocab_size,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": TINY_SHAPES["num_hidden_layers"],
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_config": dict(vision),
    }


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TINY_VISION["temporal_patch_size"],
        "merge_size": MERGE_SIZE,
    }


def published_name(name: str) -> str:
    """transformers' parameter name -> the name published Qwen2-VL checkpoints store."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


def _write_weights(out: Path, seed: int, arch: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    model_class = getattr(transformers, VLM_ARCHS[arch][0])
    with torch.device("meta"):
        model = model_class(config)
    shapes = {
        published_name(name): tuple(p.shape)
        for name, p in sorted(model.named_parameters())
        if name != "lm_head.weight"  # tied to the embeddings
    }
    save_file(random_weights(shapes, seed), str(out / "model.safetensors"), {"format": "pt"})


def cached_tiny_vlm(cache_dir: str | Path | None = None) -> Path:
    """The examples' tiny Qwen2-VL, built on first use into `cache_dir` (default:
    $XDG_CACHE_HOME/pdserve or ~/.cache/pdserve)."""
    import os

    default_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    path = (Path(cache_dir) if cache_dir else default_root) / "tiny-qwen2-vl"
    if not (path / "model.safetensors").is_file():
        build_tiny_vlm(path)
    return path
