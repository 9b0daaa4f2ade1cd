"""Oversized requests on a real CPU prefill + decode cluster (issue 10): a 100 MB body, a 5 MB
prompt and a 10,000-prompt list each get a clear 4xx quickly, while a stream already running keeps
its pace (no gap between its chunks over 0.5 s)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

MAX_GAP_S = 0.5
MAX_ROUNDS = 2
ATTACK_WITHIN_S = 30.0


def _stream_gaps(url: str, started: threading.Event, gaps: list[float]) -> None:
    """Stream 200 tokens; record the time between consecutive chunks."""
    body = {"text": "The keeper climbed", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    last = None
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            started.set()


def _attacks(model: str) -> list[tuple[str, bytes]]:
    big_body = json.dumps({"model": model, "prompt": "x" * (100 << 20), "max_tokens": 1})
    big_prompt = json.dumps({"model": model, "prompt": "word " * (1 << 20), "max_tokens": 1})
    many = json.dumps({"text": ["hi"] * 10_000, "sampling_params": {"max_new_tokens": 1}})
    return [
        ("/v1/completions", big_body.encode()),
        ("/v1/completions", big_prompt.encode()),
        ("/generate", many.encode()),
    ]


def _longest_gap_under_attack(url: str, attacks: list[tuple[str, bytes]]) -> float:
    """Send every attack while a stream runs (each must get its 4xx quickly); the stream's
    longest gap between chunks, in seconds."""
    started, gaps = threading.Event(), []
    streamer = threading.Thread(target=_stream_gaps, args=(url, started, gaps))
    streamer.start()
    assert started.wait(30), "the stream never started"
    headers = {"Content-Type": "application/json"}
    for path, body in attacks:
        t0 = time.monotonic()
        resp = httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)
        elapsed = time.monotonic() - t0
        assert resp.status_code in (400, 413), (path, resp.status_code, resp.text[:200])
        assert resp.json()["error"]["message"], resp.text[:200]
        assert elapsed < ATTACK_WITHIN_S, (path, elapsed)
    streamer.join(120)
    assert len(gaps) > 100, len(gaps)
    print(f"longest gap {max(gaps):.3f} s over {len(gaps)} chunks")
    return max(gaps)


def test_oversized_requests_get_4xx_quickly_while_a_stream_keeps_its_pace(
    pd_cluster: Cluster,
) -> None:
    url = pd_cluster.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    attacks = _attacks(model)  # built first: this process's own work must not delay the stream
    # A second round only when the first is over the limit: the gaps are timed in this process,
    # which also sends the 100 MB body, and a shared 2-core CI machine measured one 0.504 s gap
    # once (0.09-0.14 s in three runs alone); a blocked event loop stalls every round.
    longest = []
    for _ in range(MAX_ROUNDS):
        longest.append(_longest_gap_under_attack(url, attacks))
        if longest[-1] < MAX_GAP_S:
            break
    assert min(longest) < MAX_GAP_S, f"longest gap per round {longest} s"
