"""A decode worker killed mid-stream: every affected stream ends with an error, nothing hangs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow


def _stream_until_end(url: str, i: int, events: list[dict]) -> None:
    body = {
        "model": "llama",
        "prompt": f"stream {i}",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))


def test_killing_decode_ends_streams_with_error_and_marks_it_unhealthy(tiny_llama: Path) -> None:
    topology = Topology.for_model(
        str(tiny_llama),
        mode="pd",
        device="cpu",
        port=_free_port(),
        num_pages=1024,
        kv_transfer="tcp",
    )
    with Cluster(topology, log_level="error", start_timeout_s=180) as cluster:
        events: list[list[dict]] = [[] for _ in range(3)]
        threads = [
            threading.Thread(target=_stream_until_end, args=(cluster.url, i, events[i]))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        while not all(len(e) >= 2 for e in events):
            time.sleep(0.05)
        decode = next(c for c in cluster.children if c.name == "decode0")
        decode.proc.kill()
        killed = time.monotonic()
        for t in threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        assert time.monotonic() - killed < 10
        for stream_events in events:
            assert "error" in stream_events[-1], stream_events[-1]
        health = httpx.get(f"{cluster.url}/health", timeout=5)
        assert health.status_code == 503
        assert "decode0" in health.text
        # New requests are refused cleanly, not hung.
        res = httpx.post(
            f"{cluster.url}/v1/completions",
            json={"model": "llama", "prompt": "hi", "max_tokens": 2},
            timeout=15,
        )
        assert res.status_code == 503
