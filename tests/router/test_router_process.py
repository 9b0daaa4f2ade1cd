"""The router as the launcher runs it (a process: Ready once listening, exit on Shutdown) and as\nan in-process app (ASGITransport, no server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import zmq.asyncio
from router_fakes import FakeTokenizer, FakeWorker, free_port, wait_until

from pdserve.ipc import AsyncInbox, AsyncOutbox, Inbox, Outbox, new_ipc_address
from pdserve.protocol import Finish, Heartbeat, LoadReport, Ready, ReqOutput, Shutdown
from pdserve.router.app import build_app
from pdserve.router.router import Router


def test_router_process_says_ready_serves_and_exits_on_shutdown() -> None:
    router_inbox = new_ipc_address("test-router-proc")
    launcher = Inbox(new_ipc_address("test-launcher"))
    worker_inbox = new_ipc_address("test-mixed0")
    worker = FakeWorker("mixed0", "mixed", worker_inbox, router_inbox)
    tok_inbox = new_ipc_address("test-tok")
    tokenizer = FakeTokenizer(tok_inbox, router_inbox)  # its heartbeats: the router needs them
    port = free_port()
    spec = {
        "host": "127.0.0.1", "port": port, "api_key": None, "model_name": "m",
        "inbox": router_inbox, "tokenizer_inboxes": [tok_inbox],
        "workers": [{"name": "mixed0", "role": "mixed", "idx": 0, "inbox": worker_inbox}],
        "launcher_inbox": launcher.address, "liveness_timeout_s": 1.0,
    }  # fmt: skip
    code = "import json, sys; from pdserve.router.router_process import main; main(json.loads(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)])
    try:
        msg = launcher.recv(timeout_ms=20_000)
        assert isinstance(msg, Ready) and msg.name == "router"
        assert msg.info["url"] == f"http://127.0.0.1:{port}"
        url = msg.info["url"]
        assert httpx.get(url + "/health").status_code == 503  # no load report yet
        worker.start()
        tokenizer.start()
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 5.0)
        info = httpx.get(url + "/server_info").json()
        assert info["workers"][0]["name"] == "mixed0" and info["workers"][0]["healthy"]
        to_router = Outbox(router_inbox)
        to_router.send(Shutdown(grace_s=0.5))
        to_router.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        worker.close()
        tokenizer.close()
        launcher.close()


def test_router_in_process_with_asgi_transport_and_an_async_fake_tokenizer() -> None:
    """No server, one event loop: the router, the app and a fake tokenizer task side by side."""
    router_inbox, tok_inbox = new_ipc_address("test-r"), new_ipc_address("test-t")
    spec = {
        "model_name": "m", "inbox": router_inbox, "tokenizer_inboxes": [tok_inbox],
        "workers": [{"name": "mixed0", "role": "mixed", "idx": 0, "inbox": new_ipc_address("w")}],
    }  # fmt: skip

    async def fake_tokenizer(ctx: zmq.asyncio.Context) -> None:
        inbox, to_router = AsyncInbox(tok_inbox, ctx), AsyncOutbox(router_inbox, ctx)
        while True:
            req = await inbox.recv()
            to_router.send(ReqOutput(req.rid, "4", [19], Finish.stop(None), prompt_tokens=3))

    async def run() -> None:
        router = Router(spec)
        await router.start()
        router.workers.on_report(
            LoadReport("mixed0", "mixed", 0, 0, 9, 10, 0, 0.0, 1.0), time.monotonic()
        )
        router.workers.on_heartbeat(Heartbeat("tokenizer0", pid=1), time.monotonic())
        ctx = zmq.asyncio.Context()
        task = asyncio.create_task(fake_tokenizer(ctx))
        transport = httpx.ASGITransport(app=build_app(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            resp = await client.post("/v1/completions", json={"prompt": "2+2="})
        task.cancel()
        await router.stop()
        ctx.destroy(linger=0)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == "4"
        assert resp.json()["usage"]["prompt_tokens"] == 3

    asyncio.run(run())
