"""Liveness by heartbeat: a worker whose step outlasts the router's timeout stays healthy, because
its heartbeat thread never waits on the step; a worker that really goes silent does not."""

from __future__ import annotations

import asyncio
import threading
import time

from pdserve.heartbeat import HeartbeatSender
from pdserve.ipc import Outbox, new_ipc_address
from pdserve.protocol import LoadReport
from pdserve.router.router import Router

REPORT_TIMEOUT_S = 0.5
STEP_S = 4 * REPORT_TIMEOUT_S


def _spec(router_inbox: str) -> dict:
    return {
        "model_name": "m",
        "inbox": router_inbox,
        "tokenizer_inboxes": [new_ipc_address("test-hb-tok")],
        "workers": [{"name": "mixed0", "role": "mixed", "idx": 0, "inbox": "ipc://unused"}],
        "liveness_timeout_s": REPORT_TIMEOUT_S,
    }


def _worker_loop(router_inbox: str, step_started: threading.Event) -> None:
    """A worker's main thread: a load report, then one step that holds the thread (and, being
    pure Python, the GIL whenever it can) for STEP_S, then another report."""
    to_router = Outbox(router_inbox)
    report = LoadReport("mixed0", "mixed", 1, 0, 9, 10, 0, 0.0, 1.0)
    to_router.send(report)
    step_started.set()
    deadline = time.monotonic() + STEP_S
    while time.monotonic() < deadline:
        sum(range(1000))
    to_router.send(report)
    to_router.close()


async def _health_during(router: Router, seconds: float) -> list[bool]:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(router.workers.get("mixed0").is_healthy)
        await asyncio.sleep(0.05)
    return samples


def test_a_worker_whose_step_outlasts_the_liveness_timeout_stays_healthy() -> None:
    async def run() -> None:
        router_inbox = new_ipc_address("test-hb-router")
        router = Router(_spec(router_inbox))
        await router.start()
        heartbeat = HeartbeatSender("mixed0", router_inbox, interval_s=0.1).start()
        step_started = threading.Event()
        worker = threading.Thread(target=_worker_loop, args=(router_inbox, step_started))
        worker.start()
        try:
            await asyncio.to_thread(step_started.wait, 5.0)
            await asyncio.sleep(0.2)  # the first report and beats are in
            during_step = await _health_during(router, STEP_S - 0.4)
            assert during_step and all(during_step), "a long step looked like a dead worker"
            assert router.workers.get("mixed0").live.pid > 0  # known by its heartbeats
            heartbeat.stop()  # now it really goes silent (its step is over: no reports either)
            await asyncio.to_thread(worker.join, 10.0)
            after = await _health_during(router, 3 * REPORT_TIMEOUT_S)
            assert after[-1] is False and router.workers.get("mixed0").live.status == (
                "unresponsive"
            )
        finally:
            heartbeat.stop()
            worker.join(10.0)
            await router.stop()

    asyncio.run(run())
