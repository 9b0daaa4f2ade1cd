"""Fixtures for the tokenizer process tests: the tiny model's tokenizer, trained once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's directory without its weights (no torch import: these tests never run
    the model). Both archs, since transformers builds a different tokenizer class for qwen2."""
    from pdserve.tiny_model.build import (
        SPECIAL_TOKENS,
        hf_config,
        train_tokenizer,
        write_json,
        write_tokenizer,
    )

    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    tokenizer = train_tokenizer(512)
    write_tokenizer(tokenizer, out)
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    write_json(out / "config.json", hf_config(request.param, vocab_size, token_ids))
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
