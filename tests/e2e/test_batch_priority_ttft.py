"""Batch work never starves online traffic (issue 13, item 3), measured on a real CPU process tree:
the time to first token of online streaming requests, p50 over sequential requests, with a large
batch running (its lines at low priority, at most `MAX_RUNNING_LINES` at once) stays within
`MAX_RATIO` of the same figure with the cluster idle.

What keeps the figure stable on a small, loaded CI machine: the online requests are sequential
(each measures one request's latency, not a queue of our own), short (a few tokens), the same
prompt each time (the same prefill work), and the figure is a median; the batch's lines are long
enough that it is still running when the last online request ends (asserted). And one torch
thread per worker process (OMP_NUM_THREADS=1): with torch's default of one thread per core, the
busy decode worker's spinning threads starve every other process on a 2-core machine (decode steps
of 150-300 ms instead of 2.5 ms, loaded TTFT 4x the idle one, whatever the priorities).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

NUM_ONLINE = 20
NUM_BATCH_LINES = 200
MAX_RUNNING_LINES = 8  # router.max_running_batch_lines
BATCH_TOKENS = 48  # per line: the batch outlasts the measurement
MAX_RATIO = 1.5
MAX_TRIES = 2


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the children inherit it (see the docstring)
        c = _start(tiny_llama, tmp_path_factory)
    yield c
    c.stop(grace_s=1)


def _start(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    router = {"port": _free_port(), "data_dir": str(tmp_path_factory.mktemp("ttft-data")),
              "max_running_batch_lines": MAX_RUNNING_LINES}  # fmt: skip
    topology = Topology.for_model(
        str(tiny_llama), mode="pd", device="cpu", kv_transfer="tcp", num_pages=2048,
        page_size=4, router=router,
    )  # fmt: skip
    return Cluster(topology, log_level="warning", start_timeout_s=180).start()


def ttft_s(client: httpx.Client) -> float:
    """Seconds from sending one streaming completion to its first text chunk."""
    body = {"prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"]:
                first = time.perf_counter() - start
    assert first is not None, "no chunk came"
    return first


def ttft_p50(client: httpx.Client) -> float:
    return statistics.median(ttft_s(client) for _ in range(NUM_ONLINE))


def start_batch(client: openai.OpenAI) -> str:
    lines = [
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"Count with me: {i}", "max_tokens": BATCH_TOKENS,
                  "temperature": 0, "ignore_eos": True}}
        for i in range(NUM_BATCH_LINES)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("input.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
    )
    return batch.id


def wait_running(client: openai.OpenAI, batch_id: str, timeout_s: float = 60) -> None:
    """Wait until the batch's lines are being answered (its first ones are done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = client.batches.retrieve(batch_id).request_counts
        if counts and counts.completed > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not start in {timeout_s} s")


def cancel(client: openai.OpenAI, batch_id: str, timeout_s: float = 60) -> None:
    client.batches.cancel(batch_id)
    deadline = time.monotonic() + timeout_s
    while client.batches.retrieve(batch_id).status != "cancelled":
        assert time.monotonic() < deadline, f"batch {batch_id} not cancelled in {timeout_s} s"
        time.sleep(0.05)


def measure_once(client: httpx.Client, api: openai.OpenAI) -> tuple[float, float]:
    """(idle p50, p50 with a fresh batch running) in seconds; the batch is cancelled after."""
    idle = ttft_p50(client)
    batch_id = start_batch(api)
    wait_running(api, batch_id)
    loaded = ttft_p50(client)
    batch = api.batches.retrieve(batch_id)
    cancel(api, batch_id)
    done = batch.request_counts.completed if batch.request_counts else 0
    print(f"online TTFT p50: idle {idle * 1e3:.1f} ms, with the batch {loaded * 1e3:.1f} ms, "
          f"ratio {loaded / idle:.2f} (batch lines done by then: {done}/{NUM_BATCH_LINES})")  # fmt: skip
    assert batch.status == "in_progress", "the batch ended before the measurement did"
    return idle, loaded


def test_online_ttft_with_a_batch_running_stays_within_1_5x_of_idle(cluster: Cluster) -> None:
    api = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    ratios = []
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        for _ in range(3):  # warm up: first-request costs are not what is measured
            ttft_s(client)
        # A second try only when the first is over: other work on a shared CI machine moves
        # both figures, and an outside burst during one phase can fake a regression.
        for _ in range(MAX_TRIES):
            idle, loaded = measure_once(client, api)
            ratios.append(loaded / idle)
            if ratios[-1] <= MAX_RATIO:
                break
    assert min(ratios) <= MAX_RATIO, ratios
