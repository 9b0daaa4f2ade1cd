"""Dynamic membership (issue 19) on CPU: a router started alone, workers that join it one by one
while a load runs (`pdserve worker --router`), one prefill and one decode worker killed with
SIGKILL, the router itself killed and restarted (the workers join it again), the other two
workers drained with SIGTERM.

Every request of the load ends with a result or a clear error, none hangs; the requests the
drained workers held finish; every KV page of the survivors returns; and throughput follows
the number of workers. Each worker's step is slowed by a fixed sleep (fault_injection's
`step_delay_s`) and a decode worker runs at most two requests at once, so a worker's capacity
is set by that, not by how busy this machine's cores are: two decode workers serve about twice
what one does even on a shared 2-core machine.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from membership_cluster import (
    NO_WORKER,
    Load,
    Members,
    assert_ended_clearly,
    complete,
    start_router,
    summary,
    wait_pages_back,
)

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

STEP_DELAY_S = 0.03
SAME_PROMPT = "The same prompt, whichever workers compute it"


@pytest.fixture
def router(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_router(tiny_llama)
    yield cluster
    cluster.stop(grace_s=1)


class Workers(Members):
    """Workers whose step is slowed by STEP_DELAY_S, at most two requests at once each."""

    def start(self, role: str, name: str, *flags: str) -> None:
        faults = json.dumps({"step_delay_s": STEP_DELAY_S})
        flags = ("--max-running-requests", "2", "--fault-injection", faults, *flags)
        super().start(role, name, *flags)


def test_workers_join_a_lone_router_under_load_and_leave_by_drain_or_death(
    router: Cluster, tiny_llama: Path, tmp_path: Path
) -> None:
    url = router.url
    # 1. The router alone: up, and a clear 503 until a worker joins.
    r = httpx.post(f"{url}/v1/completions", json={"model": "llama", "prompt": "hi"})
    assert r.status_code == 503 and NO_WORKER in r.json()["error"]["message"]
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and NO_WORKER in health.json()["message"]

    workers = Workers(router, tiny_llama, tmp_path)
    try:
        # 2. One prefill and one decode worker join; a load starts.
        workers.start("prefill", "prefill-a")
        workers.start("decode", "decode-a")
        workers.wait_routable("prefill-a", "decode-a")
        with Load(url) as load:
            reference = complete(url, SAME_PROMPT)  # on prefill-a and decode-a
            time.sleep(0.5)  # warm up
            t0 = time.monotonic()
            time.sleep(3.0)
            t1 = time.monotonic()
            rate_one = load.num_ok_between(t0, t1) / (t1 - t0)
            # 3. A second prefill and a second decode worker join while the load runs (started
            # together: each joins on its own, whichever registers first).
            workers.start("prefill", "prefill-b")
            workers.start("decode", "decode-b")
            workers.wait_routable("prefill-b", "decode-b")
            time.sleep(1.0)
            t2 = time.monotonic()
            time.sleep(3.0)
            t3 = time.monotonic()
            rate_two = load.num_ok_between(t2, t3) / (t3 - t2)
            # greedy: the same text whichever pair (a new one's KV moved between new peers)
            assert {complete(url, SAME_PROMPT) for _ in range(4)} == {reference}
            t3 = time.monotonic()
            joined_ok = [o for o in load.outcomes if o.ended < t3]
            # 4. One of each killed: their requests end with an error naming them.
            t_kill = time.monotonic()
            for name in ("prefill-b", "decode-b"):
                workers.procs[name].send_signal(signal.SIGKILL)
            time.sleep(4.0)  # past the 2 s liveness timeout, and the check after it
            t_after_kill = time.monotonic()
            time.sleep(1.5)
        assert all(o.status == 200 for o in joined_ok), summary(joined_ok)
        assert rate_two >= 1.4 * rate_one, (rate_one, rate_two)
        killed = [o for o in load.outcomes if o.ended >= t_kill]
        assert_ended_clearly(killed, allowed=("prefill-b", "decode-b"))
        late = [o for o in killed if o.started > t_after_kill]
        assert late and all(o.status == 200 for o in late), summary(late)

        # 5. Every page of the survivors is back (the killed peers' transfers were let go).
        wait_pages_back(url, ("prefill-a", "decode-a"))

        # 6. The router restarts (killed; the launcher starts it again): the workers join it
        # again by themselves (they repeat their Register every 2 s).
        next(c for c in router.children if c.kind == "router").proc.kill()
        _wait_healthy(url, timeout_s=30.0)
        assert complete(url, SAME_PROMPT) == reference

        # 7. The others drained by SIGTERM under load: what they hold finishes, then they exit.
        with Load(url) as load:
            time.sleep(1.0)
            t_term = time.monotonic()
            for name in ("prefill-a", "decode-a"):
                workers.procs[name].send_signal(signal.SIGTERM)
            for name in ("prefill-a", "decode-a"):
                assert workers.procs[name].wait(timeout=20) == 0, workers.log(name)
            t_gone = time.monotonic()
            time.sleep(0.5)
        held = [o for o in load.outcomes if o.started < t_term - 0.05]
        assert held and all(o.status == 200 for o in held), summary(held)
        assert_ended_clearly(load.outcomes, allowed=())
        after = [o for o in load.outcomes if o.started > t_gone]
        assert after and all(o.status == 503 for o in after), summary(after)
        assert t_gone - t_term < 15.0  # as long as its requests, not the 20 s drain timeout
    finally:
        workers.stop_all()
    names = {w["name"] for w in httpx.get(f"{url}/server_info").json()["workers"]}
    assert names == set()  # left or lost: all removed


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # the router is restarting
        time.sleep(0.1)
    raise AssertionError(f"the router at {url} was not healthy again within {timeout_s} s")
