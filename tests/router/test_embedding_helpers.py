"""The pieces of the embedding routes that need no cluster: Matryoshka truncation, base64,
`dimensions` checks, input shapes; and `--is-embedding` reaching the topology and the workers."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest

from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.config.topology import Topology
from pdserve.entrypoints import launch, launch_cli
from pdserve.entrypoints.cli import main
from pdserve.router.errors import APIError
from pdserve.router.serving_embeddings import (
    check_dimensions,
    check_serves_pooling,
    encode_base64,
    pooling_config,
    prompts_of,
    truncated,
)
from pdserve.tiny_model.pooling_models import build_tiny_embedding_model


def spec_for(model: Path, is_embedding: bool) -> RouterSpec:
    worker = WorkerEntry("mixed0", "mixed", 0, "ipc:///tmp/none")
    return RouterSpec(
        model_name=model.name, inbox="ipc:///tmp/r", tokenizer_inboxes=("ipc:///tmp/t",),
        workers=(worker,), model_path=str(model), topology={"is_embedding": is_embedding},
    )  # fmt: skip


@pytest.fixture(scope="module")
def matryoshka_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = build_tiny_embedding_model(tmp_path_factory.mktemp("mrl"), pooling="mean")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32]}))
    pooling_config.cache_clear()
    return out


def test_truncation_renormalizes_only_when_the_model_normalizes() -> None:
    vector = [0.6, 0.0, 0.8]
    assert truncated(vector, None, True) == vector
    assert truncated(vector, 2, True) == [1.0, 0.0]
    assert truncated(vector, 2, False) == [0.6, 0.0]


def test_base64_is_little_endian_float32() -> None:
    raw = base64.b64decode(encode_base64([1.5, -2.0]))
    assert raw == struct.pack("<2f", 1.5, -2.0)


def test_dimensions_must_be_a_matryoshka_size_or_the_full_size(matryoshka_dir: Path) -> None:
    spec = spec_for(matryoshka_dir, True)
    for ok in (None, 16, 32, 64):
        check_dimensions(spec, ok)
    with pytest.raises(APIError, match=r"dimensions=20 .* one of \[16, 32\] or 64"):
        check_dimensions(spec, 20)


def test_a_generation_model_refuses_pooled_routes(tiny_llama: Path) -> None:
    with pytest.raises(APIError, match="needs an embedding or reward model") as e:
        check_serves_pooling(spec_for(tiny_llama, False), "/encode")
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("value", "num", "is_batch"),
    [("a", 1, False), (["a", "b"], 2, True), ([1, 2], 1, False), ([[1], [2, 3]], 2, True)],
)
def test_inputs_of_each_shape(value: object, num: int, is_batch: bool) -> None:
    prompts, batch = prompts_of(value, "input")
    assert (len(prompts), batch) == (num, is_batch)


@pytest.mark.parametrize("value", [[], [""], [[]], ""])
def test_empty_inputs_are_refused(value: object) -> None:
    with pytest.raises(APIError, match="must not be empty"):
        prompts_of(value, "input")


def test_is_embedding_flag_reaches_topology_and_workers(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Topology] = []
    monkeypatch.setattr(launch, "Cluster", lambda topology, **_: seen.append(topology))
    monkeypatch.setattr(launch_cli, "_serve", lambda cluster, grace_s: 0)
    assert main(["launch", "--model", str(tiny_llama), "--device", "cpu", "--is-embedding"]) == 0
    assert seen[0].is_embedding is True and seen[0].engine_config().is_embedding is True
    assert main(["launch", "--model", str(tiny_llama), "--device", "cpu"]) == 0
    assert seen[1].is_embedding is None and seen[1].resolved().is_embedding is False
