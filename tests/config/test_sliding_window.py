"""Which Hugging Face configs ask for a sliding attention window (transformers' rules), and the
context every process serves for them: capped at the window, where pdserve's full attention
equals the windowed one (tests/worker/test_llama_vs_hf.py checks that against transformers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.config.engine_config import sliding_window_of
from pdserve.tokenizer_proc.tokenizer_process import model_context_len


@pytest.mark.parametrize(
    ("config", "window"),
    [
        ({"model_type": "mistral", "sliding_window": 4096}, 4096),  # Mistral 7B v0.1
        ({"model_type": "mistral", "sliding_window": None}, 0),  # v0.2 and later
        ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, 0),
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True}, 4096),
        ({"model_type": "qwen3", "sliding_window": None, "use_sliding_window": False}, 0),
        ({"model_type": "llama", "sliding_window": 4096}, 0),  # Llama has none
        ({"model_type": "mistral", "sliding_window": True}, 0),
        ({"model_type": "mistral"}, 0),
    ],
)
def test_the_window_a_config_asks_for(config: dict[str, Any], window: int) -> None:
    assert sliding_window_of(config) == window


def test_a_tokenizer_started_alone_takes_the_capped_context(tmp_path: Path) -> None:
    config = {"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_context_len(str(tmp_path), tokenizer=None) == 4096
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    assert model_context_len(str(tmp_path), tokenizer=None) == 32768
