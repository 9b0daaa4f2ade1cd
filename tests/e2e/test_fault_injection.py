"""A load with 10% of KV transfers failing on purpose (topology `fault_injection:`): every request
ends, completed or with an error, none hangs, and every KV page on both workers comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

NUM_REQUESTS = 60
CONCURRENCY = 12


@pytest.fixture(scope="module")
def faulty_cluster(tiny_llama: Path) -> Iterator[Cluster]:
    topology = Topology.for_model(
        str(tiny_llama),
        mode="pd",
        device="cpu",
        port=_free_port(),
        num_pages=256,
        page_size=4,
        kv_transfer="tcp",
        fault_injection={"kv_failure_prob": 0.1, "kv_delay_s": 0.01, "seed": 0},
    )
    cluster = Cluster(topology, log_level="error", start_timeout_s=180).start()
    yield cluster
    cluster.stop(grace_s=1)


def _complete(url: str, i: int) -> tuple[int, dict]:
    body = {
        "model": "llama",
        "prompt": f"request {i}: " + "tell me more " * (i % 7),  # 1 to 6 pages of prompt
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    res = httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # a hang fails here
    return res.status_code, res.json()


def _pages_back(url: str, timeout_s: float = 15.0) -> list[dict]:
    """The workers' latest load reports once every page is free (or the last ones seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = httpx.get(f"{url}/server_info", timeout=5).json()["workers"]
        idle = all(
            w.get("num_free_pages") == w.get("num_total_pages")
            and w.get("num_running_reqs") == 0
            and w.get("num_queue_reqs") == 0
            for w in workers
        )
        if idle or time.monotonic() > deadline:
            return workers
        time.sleep(0.2)


def test_injected_kv_failures_end_requests_with_errors_and_return_every_page(
    faulty_cluster: Cluster,
) -> None:
    url = faulty_cluster.url
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda i: _complete(url, i), range(NUM_REQUESTS)))
    completed = [body for status, body in results if status == 200]
    failed = [(status, body) for status, body in results if status != 200]
    assert len(completed) + len(failed) == NUM_REQUESTS
    assert all(b["choices"][0]["finish_reason"] == "length" for b in completed)
    assert all(b["usage"]["completion_tokens"] == 4 for b in completed)
    assert all(status >= 500 and "error" in body for status, body in failed), failed[:3]
    assert any("injected" in body["error"]["message"] for _, body in failed), failed[:3]
    assert 1 <= len(failed) <= NUM_REQUESTS // 4  # about 10% of the transfers failed

    workers = _pages_back(url)
    assert {w["name"] for w in workers} == {"prefill0", "decode0"}
    for w in workers:
        assert w["num_free_pages"] == w["num_total_pages"], w
        assert w["num_running_reqs"] == 0 and w["num_queue_reqs"] == 0, w
    info = httpx.get(f"{url}/server_info", timeout=5).json()
    assert info["num_requests_in_flight"] == 0
    assert all(c.proc.poll() is None for c in faulty_cluster.children)  # none died
