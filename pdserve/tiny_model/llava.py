"""A tiny random-weight LLaVA-OneVision directory (SigLIP tower, 2-layer projector, Qwen2
decoder), offline, in seconds, under the published checkpoint names (`vision_tower.*`,
`multi_modal_projector.*`, `image_newline`, `language_model.model.*`, `language_model.lm_head`),
with the configuration of transformers' LLaVA-OneVision image processor."""

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

IMAGE, VIDEO = "<image>", "<video>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' %}{{- '<image>\\n' }}"
    "{%- elif part['type'] == 'video' %}{{- '<video>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
IMAGE_SIZE = 28  # a tile: 2 x 2 patches of 14 pixels, 4 tokens
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [56, 84], [84, 56]]
TINY_SIGLIP: dict[str, Any] = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def build_tiny_llava_onevision(out_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.add_special_tokens([IMAGE, VIDEO])
    write_tokenizer(tokenizer, out)
    ids = {t: tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_END, IMAGE, VIDEO)}
    _mark_special(out, {IMAGE: ids[IMAGE], VIDEO: ids[VIDEO]})
    text = _decoder_config("qwen2", use_sliding_window=False, tokenizer=tokenizer, ids=ids)
    config = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "text_config": text,
        "vision_config": dict(TINY_SIGLIP),
        "image_token_index": ids[IMAGE],
        "video_token_index": ids[VIDEO],
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": PINPOINTS,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(text))
    write_json(out / "preprocessor_config.json", _preprocessor_config())
    _write_weights(out, seed)
    return out


def _decoder_config(model_type: str, tokenizer: Any, ids: dict[str, int], **extra: Any) -> dict:
    """The tiny decoder's text_config: TINY_SHAPES, the tokenizer's vocabulary and special ids,
    untied embeddings, and `extra`."""
    return {
        "model_type": model_type,
        **TINY_SHAPES,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
        **extra,
    }


def _mark_special(out: Path, token_ids: dict[str, int]) -> None:
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for token, tid in token_ids.items():
        config["added_tokens_decoder"][str(tid)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }  # fmt: skip
    config["additional_special_tokens"] += list(token_ids)
    config["chat_template"] = CHAT_TEMPLATE
    write_json(path, config)


def _preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_pad": True,
        "do_convert_rgb": True,
        "image_grid_pinpoints": PINPOINTS,
    }


def published_name(name: str, tower_prefix: str = "vision_tower.vision_model.") -> str:
    """transformers' parameter name -> the published LLaVA checkpoints' (Pixtral's tower has
    no `vision_model.` level)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.vision_tower.vision_model."):
        return name.removeprefix("model.")
    if name.startswith("model.vision_tower."):
        return tower_prefix + name.removeprefix("model.vision_tower.")
    return name.removeprefix("model.")


def _write_weights(
    out: Path,
    seed: int,
    model_class: str = "LlavaOnevisionForConditionalGeneration",
    tower_prefix: str = "vision_tower.vision_model.",
) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    shapes = {
        published_name(n, tower_prefix): tuple(p.shape) for n, p in sorted(model.named_parameters())
    }
    save_file(random_weights(shapes, seed), str(out / "model.safetensors"), {"format": "pt"})


TINY_CLIP: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # the projector reads the second to last layer's output
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
}


def build_tiny_llava_next(
    out_dir: str | Path, seed: int = 0, vocab_size: int = 512, decoder: str = "llama"
) -> Path:
    """A tiny LLaVA-NeXT: CLIP tower (CLS dropped, second to last layer), a Llama decoder (or a
    Qwen2 one, `decoder="qwen2"`: the LLaVA-NeXT-72B/110B shape), every image tiled at its best
    resolution."""
    if decoder not in ("llama", "qwen2"):
        raise ValueError(f"decoder={decoder!r} is invalid: expected 'llama' or 'qwen2'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.add_special_tokens([IMAGE])
    write_tokenizer(tokenizer, out)
    ids = {t: tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_END, IMAGE)}
    _mark_special(out, {IMAGE: ids[IMAGE]})
    text = _decoder_config(decoder, tokenizer=tokenizer, ids=ids)
    if decoder == "llama":
        text.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2: q, k and v biases, no sliding window
        text["use_sliding_window"] = False
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "text_config": text,
        "vision_config": dict(TINY_CLIP),
        "image_token_index": ids[IMAGE],
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "image_grid_pinpoints": PINPOINTS,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(text))
    processor = {
        "image_processor_type": "LlavaNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_pad": True,
        "do_convert_rgb": True,
        "image_grid_pinpoints": PINPOINTS,
    }
    write_json(out / "preprocessor_config.json", processor)
    _write_weights(out, seed, "LlavaNextForConditionalGeneration")
    return out


IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
PIXTRAL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\\n", IMG)
TINY_PIXTRAL: dict[str, Any] = {
    "model_type": "pixtral",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 16,
    "num_channels": 3,
    "image_size": 112,
    "patch_size": 14,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
}


def build_tiny_pixtral(
    out_dir: str | Path, seed: int = 0, vocab_size: int = 512, mistral3: bool = False
) -> Path:
    """A tiny Pixtral (`LlavaForConditionalGeneration` with a Pixtral tower and a Mistral
    decoder): each image at its own resolution, at most 112 pixels a side (8 x 8 patches).
    mistral3: Mistral 3's layout instead (`Mistral3ForConditionalGeneration`: the same tower,
    a projector that normalizes and merges each 2 x 2 block of patches into one token)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.add_special_tokens([IMG, IMG_BREAK, IMG_END])
    write_tokenizer(tokenizer, out)
    ids = {t: tokenizer.token_to_id(t) for t in (ENDOFTEXT, IM_END, IMG, IMG_BREAK, IMG_END)}
    _mark_special(out, {t: ids[t] for t in (IMG, IMG_BREAK, IMG_END)})
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = PIXTRAL_CHAT_TEMPLATE
    write_json(path, config)
    text = _decoder_config("mistral", sliding_window=None, tokenizer=tokenizer, ids=ids)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": dict(TINY_PIXTRAL),
        "image_token_index": ids[IMG],
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if mistral3:
        config.update(architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3",
                      spatial_merge_size=2, multimodal_projector_bias=False)  # fmt: skip
        config.pop("vision_feature_select_strategy")
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config(text))
    processor = {
        "image_processor_type": "PixtralImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": TINY_PIXTRAL["image_size"]},
        "patch_size": {"height": 14, "width": 14},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_convert_rgb": True,
    }
    write_json(out / "preprocessor_config.json", processor)
    model_class = config["architectures"][0]
    _write_weights(out, seed, model_class, tower_prefix="vision_tower.")
    return out
