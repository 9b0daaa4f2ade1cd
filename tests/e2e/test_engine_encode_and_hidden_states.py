"""`Engine.encode` (both engines) and `Engine.generate(return_hidden_states=True)` (issue 11): the
in-process engine against transformers, and the process engine (a mixed worker's process tree)
against the in-process one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pdserve.entrypoints.engine import Engine
from pdserve.tiny_model.pooling_models import build_tiny_embedding_model

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there", "The capital of France is a city", "1"]
GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
TOL = 1e-4


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedding_model(tmp_path_factory.mktemp("emb"), pooling="last", seed=5)


@pytest.fixture(scope="module")
def in_process_embedder(embedding_dir: Path) -> Any:
    return Engine(str(embedding_dir), in_process=True, device="cpu", is_embedding=True)


@pytest.fixture(scope="module")
def process_embedder(embedding_dir: Path) -> Iterator[Any]:
    with Engine(str(embedding_dir), device="cpu", is_embedding=True) as engine:
        yield engine


def test_in_process_encode_equals_transformers_last_token_normalized(
    in_process_embedder: Any, embedding_dir: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedding_dir)
    model = AutoModel.from_pretrained(embedding_dir, dtype=torch.float32).eval()
    results = in_process_embedder.encode(PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            last = model(ids).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(last, dim=0)
        torch.testing.assert_close(torch.tensor(result["embedding"]), want, atol=TOL, rtol=0)
        assert result["meta_info"]["prompt_tokens"] == ids.shape[1]


def test_process_engine_encode_equals_in_process(
    in_process_embedder: Any, process_embedder: Any
) -> None:
    one = process_embedder.encode(PROMPTS[0])
    assert isinstance(one, dict) and set(one) == {"embedding", "meta_info"}
    got = process_embedder.encode(PROMPTS)
    want = in_process_embedder.encode(PROMPTS)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g["embedding"]), torch.tensor(w["embedding"]))
        assert g["meta_info"]["prompt_tokens"] == w["meta_info"]["prompt_tokens"]
    by_ids = process_embedder.encode(input_ids=[[5, 6, 7], [8]])
    assert [len(r["embedding"]) for r in by_ids] == [64, 64]


def test_embedding_engine_refuses_generate(process_embedder: Any) -> None:
    with pytest.raises(ValueError, match="needs a generation model"):
        process_embedder.generate("hi")


def test_in_process_hidden_states_equal_transformers(tiny_llama: Path) -> None:
    """(The process engine sends return_hidden_states to /generate, tested against transformers
    in test_hidden_states_and_prompt_logprobs.py.)"""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    engine = Engine(str(tiny_llama), in_process=True, device="cpu")
    outs = engine.generate(PROMPTS[:2], GREEDY, return_hidden_states=True)
    for prompt, out in zip(PROMPTS, outs):
        hidden = out["meta_info"]["hidden_states"]
        rows = torch.tensor(hidden[0] + hidden[1:])  # prompt rows, then one per fed output
        fed = engine.tokenizer(prompt)["input_ids"] + out["output_ids"][:-1]
        assert rows.shape[0] == len(fed)
        with torch.no_grad():
            want = hf(torch.tensor([fed]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(rows, want, atol=TOL, rtol=0)
    assert "hidden_states" not in engine.generate(PROMPTS[1], GREEDY)["meta_info"]
