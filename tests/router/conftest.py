"""Fixtures of the router tests (the fakes live in router_fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from router_fakes import API_KEY, Cluster, start_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    """A cluster of its own, for tests that break workers."""
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
