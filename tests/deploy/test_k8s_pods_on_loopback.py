"""The cpu overlay's topology runs the way its pods run it: one launcher per pod name (`pdserve
launch --node <pod>`), here all on this machine's loopback instead of the pods' DNS names, with
the tiny model. Requests are served by the router node; a decode pod that stops is routed around
(/health 503 naming it) and rejoins when it starts again, as a restarted pod would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

TOPOLOGY = Path(__file__).resolve().parents[2] / "deploy/k8s/overlays/cpu/topology.yaml"
WORKER_PODS = ("pdserve-prefill-0", "pdserve-decode-0", "pdserve-decode-1")


@pytest.fixture(scope="module")
def topology(tiny_llama: Path) -> Topology:
    data = yaml.safe_load(TOPOLOGY.read_text())
    data["model"] = str(tiny_llama)
    for node in data["nodes"]:
        node["address"] = "127.0.0.1"  # each pod's DNS name, on one machine
    data["router"]["port"] = _free_port(17)
    data["security"] = {"cluster_secret": "k8s-pods-loopback-test-secret"}  # the Secret's
    return Topology.from_dict(data)


def start(topology: Topology, pod: str) -> Cluster:
    return Cluster(topology, node=pod, log_level="warning", start_timeout_s=120).start()


@pytest.fixture(scope="module")
def pods(topology: Topology) -> Iterator[dict[str, Cluster]]:
    """Every pod's launcher started at once, as Kubernetes starts them: the router's waits for
    every node."""
    started: dict[str, Cluster] = {}
    pool = ThreadPoolExecutor(len(WORKER_PODS) + 1)
    futures = {pod: pool.submit(start, topology, pod) for pod in (*WORKER_PODS, "pdserve-router")}
    try:
        for pod, future in futures.items():
            started[pod] = future.result()
        yield started
    finally:
        pool.shutdown()  # waits for every launcher, also when one of them failed
        for pod, future in futures.items():
            if pod not in started and future.exception() is None:
                started[pod] = future.result()
        router = started.pop("pdserve-router", None)
        if router is not None:
            router.stop(grace_s=0)  # first, then the worker pods, all at once
        with ThreadPoolExecutor(len(started) or 1) as stopping:
            list(stopping.map(lambda cluster: cluster.stop(grace_s=0), started.values()))


def complete(url: str, n: int) -> list[int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    return [
        client.completions.create(
            model="tiny-llama",
            prompt=f"pod {i}",
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        ).usage.completion_tokens
        for i in range(n)
    ]


def wait_health(url: str, status: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.get(f"{url}/health", timeout=5)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r.json()
        time.sleep(0.25)


def test_each_pod_starts_only_its_own_processes(pods: dict[str, Cluster]) -> None:
    names = {pod: sorted(c.name for c in cluster.children) for pod, cluster in pods.items()}
    assert names == {
        "pdserve-router": ["router", "tokenizer0", "tokenizer1"],
        "pdserve-prefill-0": ["prefill0"],
        "pdserve-decode-0": ["decode0"],
        "pdserve-decode-1": ["decode1"],
    }
    assert complete(pods["pdserve-router"].url, 4) == [6] * 4


def test_a_decode_pod_that_restarts_rejoins(pods: dict[str, Cluster], topology: Topology) -> None:
    url = pods["pdserve-router"].url
    pods["pdserve-decode-1"].stop(grace_s=0)
    body = wait_health(url, 503)
    assert body["unhealthy"] == ["decode1"]
    assert complete(url, 4) == [6] * 4  # served by decode0 meanwhile
    pods["pdserve-decode-1"] = start(topology, "pdserve-decode-1")
    assert wait_health(url, 200)["status"] == "ok"
    assert complete(url, 6) == [6] * 6
