"""A tiny random-weight model (tokenizer, config, safetensors) built offline for tests."""

from __future__ import annotations

from pdserve.tiny_model.build import build_tiny_model, cached_tiny_model

__all__ = ["build_tiny_model", "cached_tiny_model"]
