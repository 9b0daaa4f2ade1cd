"""Shared fixtures: tiny models built once per session, and their transformers references; the
prefill + decode cluster the end-to-end tests and the examples' tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port
from pdserve.tiny_model import build_tiny_model

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def pd_cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real prefill + decode cluster over tcp on CPU, started once: tests/e2e and
    tests/test_examples.py share it. Its router keeps uploaded files and batch outputs (the
    batch examples') in a temporary folder."""
    topology = Topology.for_model(
        str(tiny_llama), mode="pd", device="cpu", port=_free_port(), kv_transfer="tcp",
        num_pages=1024, page_size=4, router={"data_dir": str(tmp_path_factory.mktemp("pd-data"))},
    )  # fmt: skip
    cluster = Cluster(topology, log_level="warning", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=1)
