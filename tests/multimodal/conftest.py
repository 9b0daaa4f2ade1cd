"""The tiny Qwen2-VL (built once per session) and its transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.tiny_model.vlm import build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm") / "qwen2_vl", seed=3)


@pytest.fixture(scope="session")
def hf_vlm(tiny_vlm: Path) -> Any:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_vlm, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vlm_tokenizer(tiny_vlm: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm)
