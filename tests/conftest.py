"""Shared fixtures: tiny models built once per session, and their transformers references; the
prefill + decode and the mixed-worker clusters that the end-to-end tests and the examples' tests
share.

A cluster left running idles at about a tenth of a core (its workers' loops poll), which the
CPU-bound reference tests of the rest of the session would pay for: each shared cluster stops
after the last test that may use it (CLUSTER_USERS), and tests/test_examples.py runs right after
tests/e2e."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port
from pdserve.tiny_model import build_tiny_model
from tests.e2e.e2e_clusters import start_cluster

ARCHS = ("llama", "qwen2", "qwen3")
TESTS = Path(__file__).resolve().parent
EXAMPLES_TESTS = "test_examples.py"
# Where the tests that may use each shared cluster are: folders or files under tests/ (some ask
# for theirs by name, request.getfixturevalue, so their fixtures do not say).
CLUSTER_USERS = {"pd_cluster": ("e2e", EXAMPLES_TESTS), "mixed_cluster": ("e2e",)}

_running: dict[str, Cluster] = {}  # the shared clusters started and not stopped yet
_last_users: dict[str, str] = {}  # shared cluster -> the node id of the last test that may use it


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def bench_model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the benchmarks' --smoke runs write their random checkpoints (--model-dir-root): one
    folder for the session, so a later run reuses what an earlier one wrote (a checkpoint is
    reused only when its spec is the same)."""
    return tmp_path_factory.mktemp("bench_models")


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
    yield from _shared("pd_cluster", cluster)


@pytest.fixture(scope="session")
def mixed_cluster(tiny_llama: Path) -> Iterator[Cluster]:
    """A real mixed-worker cluster on CPU, started once for tests/e2e."""
    yield from _shared("mixed_cluster", start_cluster(tiny_llama, "mixed"))


def _shared(name: str, cluster: Cluster) -> Iterator[Cluster]:
    """Yield `cluster`; stop it at the session's end unless its last user stopped it already."""
    _running[name] = cluster
    yield cluster
    _stop(name)


def _stop(name: str) -> None:
    cluster = _running.pop(name, None)
    if cluster is not None:
        cluster.stop(grace_s=1)


def _rel(item: pytest.Item) -> str:
    """The test's file, relative to tests/ ("" outside it)."""
    path = Path(item.path).resolve()
    return path.relative_to(TESTS).as_posix() if path.is_relative_to(TESTS) else ""


def _top(item: pytest.Item) -> str:
    """The first part of the test's path under tests/ (a folder, or a file of tests/)."""
    return _rel(item).split("/")[0]


def _is_under(item: pytest.Item, paths: tuple[str, ...]) -> bool:
    rel = _rel(item)
    return any(rel == p or rel.startswith(p + "/") for p in paths)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/test_examples.py right after tests/e2e: the prefill + decode cluster they share
    stops then, before the rest of the session."""
    examples = [item for item in items if _top(item) == EXAMPLES_TESTS]
    e2e = [i for i, item in enumerate(items) if _top(item) == "e2e"]
    if not examples or not e2e or items.index(examples[0]) < e2e[-1]:
        return
    rest = [item for item in items if _top(item) != EXAMPLES_TESTS]
    after = rest.index(items[e2e[-1]]) + 1
    items[:] = [*rest[:after], *examples, *rest[after:]]


def pytest_collection_finish(session: pytest.Session) -> None:
    for name, paths in CLUSTER_USERS.items():
        users = [item.nodeid for item in session.items if _is_under(item, paths)]
        if users:
            _last_users[name] = users[-1]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    for name, nodeid in _last_users.items():
        if item.nodeid == nodeid:
            _stop(name)
    return result
