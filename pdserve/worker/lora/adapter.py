"""Reads one LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) into
host tensors, refusing what pdserve cannot serve with a message naming it.

The scale (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per module with PEFT's
rank_pattern / alpha_pattern) is folded into B at load time, so applying an adapter is two
matmuls: out += (x @ A^T) @ B^T.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdserve.config.engine_config import ModelConfig
from pdserve.config.lora_config import LORA_TARGET_MODULES

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
# A vision-language model's parts that LoRA does not reach (its tower's layers are named like the
# decoder's: `vision_tower.encoder.layers.0.self_attn.q_proj` would match `_KEY`).
_VISION_PART = re.compile(r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector)\.")
_WEIGHT_FILES = ("adapter_model.safetensors",)


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable projection of the model."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@dataclass
class LoraAdapter:
    """One adapter on the host. weights[(layer, module)] = (A [r, in], B [out, r] * scale),
    float32, cpu; a (layer, module) the adapter does not touch is absent."""

    name: str
    path: str
    rank: int  # the largest rank over its modules
    target_modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str | Path, model_config: ModelConfig) -> LoraAdapter:
    """Read and check the adapter at `path`; ValueError naming what is wrong or unsupported."""
    folder = Path(path)
    config = _read_config(folder)
    _check_config(config, folder)
    tensors = _read_tensors(folder)
    weights = _pair_weights(tensors, folder, model_config)
    for (layer, module), (a, b) in weights.items():
        r = a.shape[0]
        alpha = _pattern_value(
            config.get("alpha_pattern") or {}, layer, module, config.get("lora_alpha", 8)
        )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[(layer, module)] = (a, b * scale)
    return LoraAdapter(
        name=name,
        path=str(path),
        rank=max(a.shape[0] for a, _ in weights.values()),
        target_modules=frozenset(module for _, module in weights),
        weights=weights,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise ValueError(
            f"LoRA adapter path {str(folder)!r} has no adapter_config.json: expected a PEFT "
            "adapter directory (save_pretrained)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _check_config(config: dict[str, Any], folder: Path) -> None:
    """Refuse the PEFT features pdserve does not implement, naming the key."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{folder}: peft_type={peft_type!r} is not supported: expected 'LORA'")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "lora_bias": "LoRA biases are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D models) is not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise ValueError(f"{folder}: {key}={config[key]!r}: {why}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"{folder}: bias={bias!r} is not supported: expected 'none'")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        bad = [t for t in targets if t not in LORA_TARGET_MODULES]
        if bad:
            raise ValueError(
                f"{folder}: target_modules {bad} are not supported: pdserve adapts "
                f"{list(LORA_TARGET_MODULES)}"
            )


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for file_name in _WEIGHT_FILES:
        file = folder / file_name
        if file.is_file():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k).float() for k in f.keys()}
    raise ValueError(
        f"LoRA adapter path {str(folder)!r} has no adapter_model.safetensors: expected PEFT's "
        "safetensors format"
    )


def _pair_weights(
    tensors: dict[str, torch.Tensor], folder: Path, model_config: ModelConfig
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, module): (A, B)} from the checkpoint names, shapes checked against the model."""
    shapes = module_shapes(model_config)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if _VISION_PART.search(key):
            raise ValueError(
                f"{folder}: tensor {key!r} adapts the vision tower or its projector: pdserve "
                "applies LoRA to the decoder's layers only (train the adapter with target_modules "
                "limited to the language model)"
            )
        m = _KEY.search(key)
        if m is None or m.group(2) not in shapes:
            raise ValueError(
                f"{folder}: tensor {key!r} adapts a module pdserve does not have: expected "
                f"LoRA weights of {list(LORA_TARGET_MODULES)} in model.layers.N"
            )
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= model_config.num_layers:
            raise ValueError(
                f"{folder}: tensor {key!r}: the model has {model_config.num_layers} layers"
            )
        parts.setdefault((layer, module), {})[which] = tensor
    if not parts:
        raise ValueError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
    out = {}
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        in_f, out_f = shapes[module]
        if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{folder}: layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} do not fit the model: expected [r, {in_f}] and [{out_f}, r]"
            )
        out[(layer, module)] = (a.contiguous(), b.contiguous())
    return out


def _pattern_value(pattern: dict[str, Any], layer: int, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matching the module's name's end."""
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    full_name = f"model.layers.{layer}.{block}.{module}"
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return value
    return default
