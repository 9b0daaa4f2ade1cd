"""A shutdown whose grace period runs out ends each open stream with an error event, never a cut."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
from router_fakes import FakeTokenizer, FakeWorker, free_port, wait_until

from pdserve.ipc import Outbox, new_ipc_address
from pdserve.protocol import Shutdown


def test_streams_still_open_when_the_grace_period_ends_get_an_error_event() -> None:
    router_inbox = new_ipc_address("test-shutdown-router")
    tok_inbox, worker_inbox = new_ipc_address("test-sd-tok"), new_ipc_address("test-sd-mixed0")
    peers = [FakeTokenizer(tok_inbox, router_inbox), FakeWorker("mixed0", "mixed", worker_inbox,
             router_inbox)]  # fmt: skip
    port = free_port()
    spec = {
        "host": "127.0.0.1", "port": port, "model_name": "m", "inbox": router_inbox,
        "tokenizer_inboxes": [tok_inbox], "liveness_timeout_s": 1.0,
        "workers": [{"name": "mixed0", "role": "mixed", "idx": 0, "inbox": worker_inbox}],
    }  # fmt: skip
    code = "import json, sys; from pdserve.router.router_process import main; main(json.loads(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)])
    try:
        for peer in peers:
            peer.start()
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _health(url) == 200, 60.0)
        body = {"model": "m", "prompt": "HANG until shutdown", "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20) as response:
            lines = response.iter_lines()
            assert "data:" in next(line for line in lines if line)
            stopped = time.monotonic()
            to_router = Outbox(router_inbox)
            to_router.send(Shutdown(grace_s=0.5))
            to_router.close()
            rest = [line for line in lines if line.startswith("data:")]
        assert "shutting down" in json.loads(rest[0][5:])["error"]["message"], rest
        assert rest[-1] == "data: [DONE]"
        assert 0.5 <= time.monotonic() - stopped < 10.0  # the grace period, then at once
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for peer in peers:
            peer.close()


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=1).status_code
    except httpx.HTTPError:
        return 0
