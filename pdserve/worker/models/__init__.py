"""Model registry: Hugging Face architecture name -> decoder class, and the one way to build one."""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.kernels.attention import get_attention_backend
from pdserve.worker.models.llama import LlamaForCausalLM
from pdserve.worker.models.llama_pooling import LlamaForPooling
from pdserve.worker.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from pdserve.worker.models.pixtral import PixtralForConditionalGeneration
from pdserve.worker.models.qwen2_vl import Qwen2VLForConditionalGeneration
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup

Model = LlamaForCausalLM | LlamaForPooling
_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
_ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    f"{family}ForCausalLM": LlamaForCausalLM for family in _FAMILIES
}
_ARCHITECTURES["Qwen2VLForConditionalGeneration"] = Qwen2VLForConditionalGeneration
_ARCHITECTURES["Qwen2_5_VLForConditionalGeneration"] = Qwen2VLForConditionalGeneration
for _llava in ("LlavaOnevisionForConditionalGeneration", "LlavaNextForConditionalGeneration"):
    _ARCHITECTURES[_llava] = LlavaOnevisionForConditionalGeneration  # type: ignore[assignment]
for _pixtral in ("LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration"):
    _ARCHITECTURES[_pixtral] = PixtralForConditionalGeneration  # type: ignore[assignment]
# Pooling models (ModelConfig.is_embedding): any head of the family, with or without a score head.
_POOLING_ARCHITECTURES: dict[str, type[LlamaForPooling]] = {
    f"{family}{head}": LlamaForPooling
    for family in _FAMILIES
    for head in ("ForCausalLM", "Model", "ForSequenceClassification")
}
# gme-Qwen2-VL: a Qwen2-VL checkpoint pooled (last token); its unused lm_head is loaded as is.
_POOLING_ARCHITECTURES["Qwen2VLForConditionalGeneration"] = Qwen2VLForConditionalGeneration  # type: ignore[assignment]


def build_model(
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str = "torch",
    tp: TPGroup = SINGLE,
) -> Model:
    """The decoder for model_config.architecture, with allocated but unloaded parameters."""
    registry = _POOLING_ARCHITECTURES if model_config.is_embedding else _ARCHITECTURES
    model_cls = registry.get(model_config.architecture)
    if model_cls is None:
        raise ValueError(
            f"architecture={model_config.architecture!r} has no model: expected one "
            f"of {sorted(registry)}"
        )
    return model_cls(model_config, dtype, device, get_attention_backend(attention_backend), tp)


def load_model(
    model_config: ModelConfig,
    model_path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str = "torch",
    tp: TPGroup = SINGLE,
) -> Model:
    """build_model, then fill its weights from the safetensors checkpoint in model_path (with
    tp > 1, only this rank's shards of each tensor are read)."""
    # Imported here: weight_loader imports models.llama, so a top-level import would be circular.
    from pdserve.worker.weight_loader import load_weights

    model = build_model(model_config, dtype, device, attention_backend, tp)
    load_weights(model, model_path)
    return model
