"""Online time to first token with and without a Batch API job running (issue 13: batch work must
not starve online traffic). Used by `tests/e2e/test_batch_priority_ttft.py` (CPU, tiny model) and
`benchmarks/gpu/batch_ttft.py` (GPU).

The online requests are sequential, short and identical, and the figure is a median, so it measures
one request's latency rather than a queue of the caller's own making.
"""

from __future__ import annotations

import json
import statistics
import time

import httpx
import openai

NUM_ONLINE = 20
NUM_BATCH_LINES = 200
BATCH_TOKENS = 48  # per line: the batch outlasts the measurement


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


def start_batch(
    client: openai.OpenAI, num_lines: int = NUM_BATCH_LINES, max_tokens: int = BATCH_TOKENS
) -> str:
    lines = [
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": f"Count with me: {i}", "max_tokens": max_tokens,
                  "temperature": 0, "ignore_eos": True}}
        for i in range(num_lines)
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


def measure_once(
    client: httpx.Client,
    api: openai.OpenAI,
    num_lines: int = NUM_BATCH_LINES,
    max_tokens: int = BATCH_TOKENS,
) -> tuple[float, float]:
    """(idle p50, p50 with a fresh batch running) in seconds; the batch is cancelled after."""
    idle = ttft_p50(client)
    batch_id = start_batch(api, num_lines, max_tokens)
    wait_running(api, batch_id)
    loaded = ttft_p50(client)
    batch = api.batches.retrieve(batch_id)
    cancel(api, batch_id)
    done = batch.request_counts.completed if batch.request_counts else 0
    print(f"online TTFT p50: idle {idle * 1e3:.1f} ms, with the batch {loaded * 1e3:.1f} ms, "
          f"ratio {loaded / idle:.2f} (batch lines done by then: {done}/{num_lines})")  # fmt: skip
    assert batch.status == "in_progress", "the batch ended before the measurement did"
    return idle, loaded
