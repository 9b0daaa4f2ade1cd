"""A tensor-parallel mixed worker (tp 2 on CPU, gloo) in the real process tree: greedy outputs
over HTTP equal a tp 1 engine's; `kill -9` of a follower rank takes the worker down (the router
reports it unhealthy, the launcher restarts all its ranks); `kill -9` of rank 0 ends its follower.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300, 11, 12, 13, 14, 15, 16], [42]]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path) -> Iterator[Cluster]:
    topology = Topology.for_model(
        str(tiny_llama),
        mode="mixed",
        device="cpu",
        port=_free_port(),
        num_pages=256,
        page_size=4,
        tp_size=2,
        supervision={"restart_backoff_s": 0.2, "heartbeat_interval_s": 0.5},
    )
    cluster = Cluster(topology, log_level="error", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=5)


@pytest.fixture(scope="module")
def want(tiny_llama: Path) -> list[list[int]]:
    with Engine(str(tiny_llama), in_process=True, device="cpu") as engine:
        return [r["output_ids"] for r in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def _generate(cluster: Cluster) -> list[list[int]]:
    body = {"input_ids": PROMPTS, "sampling_params": GREEDY}
    r = httpx.post(f"{cluster.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


def _worker(cluster: Cluster) -> psutil.Process:
    child = next(c for c in cluster.children if c.name == "mixed0")
    return psutil.Process(child.proc.pid)


def _wait_healthy(cluster: Cluster, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{cluster.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the cluster did not become healthy")


def _wait_unhealthy(cluster: Cluster, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{cluster.url}/health", timeout=2).status_code == 503:
            return
        time.sleep(0.05)
    raise AssertionError("/health never reported the worker down")


def _followers(worker: psutil.Process, timeout_s: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while not (kids := worker.children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return kids


def test_tp2_worker_greedy_outputs_equal_tp1(cluster: Cluster, want: list[list[int]]) -> None:
    _wait_healthy(cluster)
    assert len(_followers(_worker(cluster))) == 1  # rank 1
    assert _generate(cluster) == want


def test_a_killed_follower_takes_its_worker_down_and_it_comes_back(
    cluster: Cluster, want: list[list[int]]
) -> None:
    _wait_healthy(cluster)
    worker = _worker(cluster)
    (follower,) = _followers(worker)
    follower.kill()
    assert worker.wait(10) != 0  # rank 0 exits: it cannot serve without rank 1
    _wait_unhealthy(cluster)
    _wait_healthy(cluster)  # restarted by the launcher, both ranks
    assert _worker(cluster).pid != worker.pid
    assert _generate(cluster) == want


def test_a_killed_rank0_ends_its_follower(cluster: Cluster) -> None:
    _wait_healthy(cluster)
    worker = _worker(cluster)
    (follower,) = _followers(worker)
    worker.kill()
    follower.wait(10)  # psutil.TimeoutExpired if it lingers
    _wait_unhealthy(cluster)  # (the launcher restarts the worker, as for a follower's death)
