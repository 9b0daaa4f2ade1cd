"""Real process trees on CPU: a prefill + decode cluster over tcp, and a mixed-worker cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow


def start_cluster(model: Path, mode: str, **overrides: Any) -> Cluster:
    topology = Topology.for_model(
        str(model),
        mode=mode,
        device="cpu",
        port=_free_port(),
        num_pages=1024,
        page_size=4,
        **overrides,
    )
    return Cluster(topology, log_level="warning", start_timeout_s=180).start()


@pytest.fixture(scope="session")
def pd_cluster(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_cluster(tiny_llama, "pd", kv_transfer="tcp")
    yield cluster
    cluster.stop(grace_s=1)


@pytest.fixture(scope="session")
def mixed_cluster(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_cluster(tiny_llama, "mixed")
    yield cluster
    cluster.stop(grace_s=1)
