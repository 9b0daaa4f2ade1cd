"""Real process trees on CPU: a prefill + decode cluster over tcp, and a mixed-worker cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_clusters import start_cluster

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow


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
