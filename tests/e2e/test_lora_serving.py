"""LoRA end to end on a real prefill + decode cluster (CPU, tcp KV transfer) launched with two
adapters: greedy text per adapter from the openai client and /generate equals the in-process
engine's (which tests/worker/test_lora_vs_peft.py checks against peft); live load, use, unload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import start_cluster
from lora_adapters import ADAPTER_SPECS, make_adapter, make_adapters

from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "once upon a time there"]
MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e_adapters")
    made = make_adapters(tiny_llama, root)
    made["gamma"] = make_adapter(tiny_llama, root / "gamma", seed=9, **ADAPTER_SPECS["gamma"])
    return made


@pytest.fixture(scope="module")
def lora_cluster(tiny_llama: Path, adapters: dict[str, Path]) -> Iterator[Cluster]:
    paths = [f"alpha={adapters['alpha']}", str(adapters["beta"])]  # beta: named by its folder
    cluster = start_cluster(
        tiny_llama,
        "pd",
        kv_transfer="tcp",
        lora_paths=paths,
        max_lora_rank=8,
        max_loras_per_batch=2,
    )
    yield cluster
    cluster.stop(grace_s=1)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, adapters: dict[str, Path]) -> dict[str | None, list[str]]:
    """Greedy texts of each prompt from the in-process engine, per adapter (None: base)."""
    engine = Engine(
        str(tiny_llama),
        in_process=True,
        device="cpu",
        num_pages=256,
        page_size=4,
        lora_paths=[f"{n}={p}" for n, p in adapters.items()],
    )
    out = {
        lora: [r["text"] for r in engine.generate(PROMPTS, GREEDY, lora_path=lora)]
        for lora in (None, "alpha", "beta", "gamma")
    }
    engine.shutdown()
    return out


def _complete(cluster: Cluster, model: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_openai_model_names_pick_adapters_and_match_the_engine(
    lora_cluster: Cluster, reference: dict[str | None, list[str]]
) -> None:
    model = lora_cluster.topology.model_name
    assert reference["alpha"] != reference[None] and reference["beta"] != reference[None]
    assert _complete(lora_cluster, model) == reference[None]
    assert _complete(lora_cluster, "alpha") == reference["alpha"]
    assert _complete(lora_cluster, f"{model}:beta") == reference["beta"]
    models = openai.OpenAI(base_url=f"{lora_cluster.url}/v1", api_key="x").models.list()
    parents = {m.id: getattr(m, "parent", None) for m in models.data}
    assert parents == {model: None, "alpha": model, "beta": model}


def test_generate_batch_mixes_base_and_adapters(
    lora_cluster: Cluster, reference: dict[str | None, list[str]]
) -> None:
    loras = ["alpha", None, "beta", "alpha"]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    body = {"text": prompts, "sampling_params": GREEDY, "lora_path": loras}
    items = httpx.post(f"{lora_cluster.url}/generate", json=body, timeout=60).json()
    want = [reference[lora][PROMPTS.index(p)] for lora, p in zip(loras, prompts)]
    assert [it["text"] for it in items] == want
    bad = httpx.post(f"{lora_cluster.url}/generate", json={**body, "lora_path": "nope"})
    assert bad.status_code == 400 and "nope" in bad.text


def test_live_load_use_unload(
    lora_cluster: Cluster, adapters: dict[str, Path], reference: dict[str | None, list[str]]
) -> None:
    url = lora_cluster.url
    load = {"lora_name": "gamma", "lora_path": str(adapters["gamma"])}
    reply = httpx.post(f"{url}/load_lora_adapter", json=load, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["loaded_adapters"] == ["alpha", "beta", "gamma"]
    assert _complete(lora_cluster, "gamma") == reference["gamma"]
    again = httpx.post(f"{url}/load_lora_adapter", json=load, timeout=60)
    assert again.status_code == 400 and "already loaded" in again.json()["error_message"]
    missing = {"lora_name": "delta", "lora_path": str(adapters["gamma"]) + "-missing"}
    failed = httpx.post(f"{url}/load_lora_adapter", json=missing, timeout=60)
    assert failed.status_code == 400 and "adapter_config.json" in failed.json()["error_message"]
    gone = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert gone.status_code == 200 and gone.json()["loaded_adapters"] == ["alpha", "beta"]
    with pytest.raises(openai.BadRequestError, match="gamma"):
        _complete(lora_cluster, "gamma")
    unknown = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert unknown.status_code == 404
