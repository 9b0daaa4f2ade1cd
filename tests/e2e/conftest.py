"""Real process trees on CPU: a mixed-worker cluster (the prefill + decode one over tcp,
`pd_cluster`, is in tests/conftest.py: the examples' tests share it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_clusters import start_cluster

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def mixed_cluster(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_cluster(tiny_llama, "mixed")
    yield cluster
    cluster.stop(grace_s=1)
