"""On a GPU with default settings (CUDA graphs on): an embedding model starts and its vectors equal
transformers'. Graphs capture decode steps, which an embedding model never runs."""

from __future__ import annotations

import pytest
import torch

from pdserve.entrypoints.engine import Engine
from pdserve.tiny_model.pooling_models import cached_tiny_pooling_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_an_embedding_model_serves_on_cuda_with_graphs_on() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = cached_tiny_pooling_model("embedding")  # mean pooling, normalized
    engine = Engine(str(path), in_process=True, device="cuda", dtype="float32")
    prompts = ["The keeper climbed the stairs", "a b c"]
    results = engine.encode(prompts)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, result in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            mean = model(ids).last_hidden_state[0].mean(dim=0)
        want = torch.nn.functional.normalize(mean, dim=0)
        torch.testing.assert_close(torch.tensor(result["embedding"]), want, atol=1e-4, rtol=0)
    engine.shutdown()
