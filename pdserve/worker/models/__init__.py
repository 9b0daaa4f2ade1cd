"""Model registry: Hugging Face architecture name -> decoder class, and the one way to build one."""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.config.engine_config import ModelConfig
from pdserve.kernels.attention import get_attention_backend
from pdserve.worker.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def build_model(
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str = "torch",
) -> LlamaForCausalLM:
    """The decoder for model_config.architecture, with allocated but unloaded parameters."""
    model_cls = _ARCHITECTURES.get(model_config.architecture)
    if model_cls is None:
        raise ValueError(
            f"architecture={model_config.architecture!r} has no model: expected one "
            f"of {sorted(_ARCHITECTURES)}"
        )
    return model_cls(model_config, dtype, device, get_attention_backend(attention_backend))


def load_model(
    model_config: ModelConfig,
    model_path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str = "torch",
) -> LlamaForCausalLM:
    """build_model, then fill its weights from the safetensors checkpoint in model_path."""
    # Imported here: weight_loader imports models.llama, so a top-level import would be circular.
    from pdserve.worker.weight_loader import load_weights

    model = build_model(model_config, dtype, device, attention_backend)
    load_weights(model, model_path)
    return model
