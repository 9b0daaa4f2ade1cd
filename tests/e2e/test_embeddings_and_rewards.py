"""Embeddings and reward scores through the real process trees (issue 11), against transformers
(fp32, CPU): `/v1/embeddings` through the official openai client on a prefill + decode cluster
(tcp) of a tiny mean-pooling, normalizing embedding model, and `/classify` on a mixed worker of
a tiny reward model; plus the 400s that keep each kind of model on its own routes."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from pdserve.entrypoints.launch import Cluster
from pdserve.tiny_model.pooling_models import build_tiny_embedding_model, build_tiny_reward_model
from tests.e2e.conftest import start_cluster

pytestmark = pytest.mark.slow

TEXTS = ["Hello world", "The capital of France is Paris, of course.", "a"]  # mixed lengths
TOL = 1e-4


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_embedding_model(tmp_path_factory.mktemp("emb"), pooling="mean", seed=3)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("reward"), num_labels=2, seed=4)


@pytest.fixture(scope="module")
def embedding_cluster(embedding_dir: Path) -> Iterator[Cluster]:
    cluster = start_cluster(embedding_dir, "pd", kv_transfer="tcp")  # detected: modules.json
    yield cluster
    cluster.stop(grace_s=1)


@pytest.fixture(scope="module")
def reward_cluster(reward_dir: Path) -> Iterator[Cluster]:
    cluster = start_cluster(reward_dir, "mixed", is_embedding=True)
    yield cluster
    cluster.stop(grace_s=1)


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def mean_pooled_reference(model_dir: Path, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """sentence-transformers' recipe: mean of the final (normed) states over the tokens, L2."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    vectors, lengths = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            mean = model(ids).last_hidden_state[0].mean(dim=0)
            vectors.append(torch.nn.functional.normalize(mean, dim=0))
            lengths.append(ids.shape[1])
    return torch.stack(vectors), lengths


def as_floats(embedding: list[float] | str) -> list[float]:
    """A vector as given, or decoded from base64 (little-endian float32, as OpenAI sends it;
    the client decodes it only when it chose the format itself)."""
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.mark.parametrize("encoding_format", ["float", "base64", openai.NOT_GIVEN])
def test_openai_embeddings_equal_transformers_mean_pooling(
    embedding_cluster: Cluster, embedding_dir: Path, encoding_format: str
) -> None:
    want, lengths = mean_pooled_reference(embedding_dir, TEXTS)
    for _ in range(2):  # the second time the prompts' pages are in the prefix cache
        res = client(embedding_cluster).embeddings.create(
            model=embedding_dir.name, input=TEXTS, encoding_format=encoding_format
        )
        got = torch.tensor(
            [as_floats(d.embedding) for d in sorted(res.data, key=lambda d: d.index)]
        )
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert res.usage.prompt_tokens == res.usage.total_tokens == sum(lengths)


def test_embeddings_of_token_ids_equal_those_of_text(
    embedding_cluster: Cluster, embedding_dir: Path
) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(embedding_dir)(TEXTS[1])["input_ids"]
    by_ids = client(embedding_cluster).embeddings.create(model=embedding_dir.name, input=[ids])
    want, _ = mean_pooled_reference(embedding_dir, [TEXTS[1]])
    torch.testing.assert_close(torch.tensor([by_ids.data[0].embedding]), want, atol=TOL, rtol=0)


def test_truncated_embeddings_equal_those_of_the_last_tokens(
    embedding_cluster: Cluster, embedding_dir: Path
) -> None:
    """vLLM's truncate_prompt_tokens: the vector of the prompt's last N tokens, against
    transformers' mean pooling of exactly those ids."""
    from transformers import AutoModel, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(embedding_dir)(TEXTS[1])["input_ids"]
    keep = len(ids) // 2
    res = client(embedding_cluster).embeddings.create(
        model=embedding_dir.name, input=TEXTS[1], extra_body={"truncate_prompt_tokens": keep}
    )
    model = AutoModel.from_pretrained(embedding_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        mean = model(torch.tensor([ids[-keep:]])).last_hidden_state[0].mean(dim=0)
    want = torch.nn.functional.normalize(mean, dim=0)
    torch.testing.assert_close(torch.tensor(res.data[0].embedding), want, atol=TOL, rtol=0)
    assert res.usage.prompt_tokens == keep


def test_encode_returns_sglang_shape_one_or_a_batch(embedding_cluster: Cluster) -> None:
    one = httpx.post(f"{embedding_cluster.url}/encode", json={"text": TEXTS[0]}, timeout=60)
    assert one.status_code == 200, one.text
    assert len(one.json()["embedding"]) == 64 and one.json()["meta_info"]["prompt_tokens"] > 0
    batch = httpx.post(f"{embedding_cluster.url}/encode", json={"text": TEXTS}, timeout=60)
    assert [len(item["embedding"]) for item in batch.json()] == [64] * len(TEXTS)
    torch.testing.assert_close(
        torch.tensor(batch.json()[0]["embedding"]), torch.tensor(one.json()["embedding"])
    )


def test_bad_embedding_requests_get_400_naming_the_problem(
    embedding_cluster: Cluster, embedding_dir: Path
) -> None:
    with pytest.raises(openai.BadRequestError, match="dimensions=16"):
        client(embedding_cluster).embeddings.create(
            model=embedding_dir.name, input="hi", dimensions=16
        )
    with pytest.raises(openai.BadRequestError, match="input must not be empty"):
        client(embedding_cluster).embeddings.create(model=embedding_dir.name, input=[])
    with pytest.raises(openai.BadRequestError, match="needs a generation model"):
        client(embedding_cluster).completions.create(model=embedding_dir.name, prompt="hi")
    info = httpx.get(f"{embedding_cluster.url}/get_model_info", timeout=10).json()
    assert info["is_generation"] is False


@pytest.mark.parametrize("kind", ["embedding", "reward"])
def test_health_generate_on_an_embedding_model_runs_an_encode(
    kind: str, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue(f"{kind}_cluster")
    res = httpx.get(f"{cluster.url}/health_generate", timeout=60)
    assert res.status_code == 200, res.text
    assert res.json() == {"status": "ok"}


def test_generation_model_refuses_embeddings(pd_cluster: Cluster) -> None:
    for path, body in [("/v1/embeddings", {"input": "hi"}), ("/classify", {"text": "hi"})]:
        res = httpx.post(f"{pd_cluster.url}{path}", json=body, timeout=30)
        assert res.status_code == 400, res.text
        assert "needs an embedding or reward model" in res.json()["error"]["message"]


def test_classify_scores_equal_sequence_classification_logits(
    reward_cluster: Cluster, reward_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    convs = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}] for t in TEXTS
    ]
    prompts = tokenizer.apply_chat_template(convs, tokenize=False)
    res = httpx.post(f"{reward_cluster.url}/classify", json={"text": prompts}, timeout=60)
    assert res.status_code == 200, res.text
    got = torch.tensor([item["embedding"] for item in res.json()])
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32)
    with torch.no_grad():
        want = torch.cat([model(tokenizer(p, return_tensors="pt")["input_ids"]).logits
                          for p in prompts])  # fmt: skip
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
