"""LoRA adapters and dynamic membership: an adapter loaded on a lone router (`router.membership`)
is loaded onto each worker that joins before the worker gets traffic, so a request naming it
gives the in-process engine's greedy text; a worker that cannot load it (started without LoRA
slots) is taken out again and refused: it exits naming the adapter, while the cluster goes on
serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lora_adapters import ADAPTER_SPECS, make_adapter
from membership_cluster import Members, start_router

from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

PROMPT = "the quick brown fox"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("membership_lora")
    return make_adapter(tiny_llama, root / "beta", seed=5, **ADAPTER_SPECS["beta"])


@pytest.fixture
def router(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_router(tiny_llama)
    yield cluster
    cluster.stop(grace_s=1)


def _complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_joining_worker_loads_the_clusters_adapters_first(
    router: Cluster, tiny_llama: Path, adapter: Path, tmp_path: Path
) -> None:
    with Engine(
        str(tiny_llama), in_process=True, device="cpu", lora_paths=[f"beta={adapter}"]
    ) as e:
        want = {lora: e.generate(PROMPT, GREEDY, lora_path=lora)["text"] for lora in (None, "beta")}
    assert want["beta"] != want[None]  # the adapter matters
    load = {"lora_name": "beta", "lora_path": str(adapter)}
    assert httpx.post(f"{router.url}/load_lora_adapter", json=load, timeout=60).status_code == 200

    members = Members(router, tiny_llama, tmp_path)
    try:
        members.start("mixed", "with-slots", "--max-loras-per-batch", "2", "--max-lora-rank", "8",
                      "--lora-target-modules", "all")  # fmt: skip
        members.wait_routable("with-slots")
        assert _complete(router.url, "beta") == want["beta"]
        assert _complete(router.url, "llama") == want[None]

        members.start("mixed", "no-slots")  # no LoRA: it cannot load beta
        assert members.procs["no-slots"].wait(60) == 1  # refused: it exits, saying why
        assert "could not load the cluster's LoRA adapter 'beta'" in members.log("no-slots")
        assert "no-slots" not in members.members()
        assert _complete(router.url, "beta") == want["beta"]  # served by the other, as before
    finally:
        members.stop_all()
