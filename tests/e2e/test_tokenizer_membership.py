"""Tokenizers that join a running router (`pdserve tokenizer --router`, issue 19) on CPU: a router
started alone with its own tokenizer, one joined mixed worker, and a load; two tokenizers join
under it and serve requests, one is drained with SIGTERM (no request lost, it exits 0), the
other killed with SIGKILL (its requests end with a 500 naming it, the router stops using it).
The router's own tokenizer serves throughout."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from membership_cluster import (
    Load,
    Members,
    assert_ended_clearly,
    start_router,
    summary,
    wait_pages_back,
)

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

STEP_DELAY_S = 0.03  # each request takes a few tenths of a second: tokenizers hold some
NUM_CLIENTS = 4


@pytest.fixture
def router(tiny_llama: Path) -> Iterator[Cluster]:
    cluster = start_router(tiny_llama)
    yield cluster
    cluster.stop(grace_s=1)


def test_tokenizers_join_under_load_serve_and_leave_by_drain_or_death(
    router: Cluster, tiny_llama: Path, tmp_path: Path
) -> None:
    url = router.url
    members = Members(router, tiny_llama, tmp_path)
    faults = json.dumps({"step_delay_s": STEP_DELAY_S})
    try:
        members.start(
            "mixed", "mixed-a", "--max-running-requests", "4", "--fault-injection", faults
        )
        members.wait_routable("mixed-a")
        with Load(url, NUM_CLIENTS) as load:
            # 1. Two tokenizers join under load.
            members.start_tokenizer("tok-b")
            members.start_tokenizer("tok-c")
            members.wait_routable("tok-b", "tok-c", timeout_s=120.0)  # a busy machine: slow
            time.sleep(1.0)
            served = _num_requests(members)
            # 2. tok-b drained by SIGTERM while it holds requests: they finish; it exits 0.
            _wait_in_flight(members, "tok-b")
            t_term = time.monotonic()
            members.procs["tok-b"].send_signal(signal.SIGTERM)
            assert members.procs["tok-b"].wait(timeout=30) == 0, members.log("tok-b")
            t_gone = time.monotonic()
            assert "tok-b" not in members.members()
            # 3. tok-c killed while it holds requests.
            _wait_in_flight(members, "tok-c")
            t_kill = time.monotonic()
            members.procs["tok-c"].send_signal(signal.SIGKILL)
            _wait_removed(members, "tok-c", timeout_s=10.0)  # past the 2 s liveness timeout
            t_removed = time.monotonic()
            time.sleep(1.0)
        outcomes = load.snapshot()
        after = _num_requests(members)
        # Each joined tokenizer served requests (each routed one ended 200, below), and so did
        # the router's own, before and after they left.
        assert served["tok-b"] > 0 and served["tok-c"] > 0, served
        assert after["tokenizer0"] > served["tokenizer0"] > 0, (served, after)
        assert t_gone - t_term < 20.0  # as long as its requests, not the router's drain timeout
        before_kill = [o for o in outcomes if o.ended < t_kill]
        assert before_kill and all(o.status == 200 for o in before_kill), summary(before_kill)
        assert_ended_clearly(outcomes, allowed=("tok-c",))  # a 500 names it; nothing hangs
        lost = [o for o in outcomes if o.status == 500]
        assert lost and all("tok-c is unresponsive" in o.error for o in lost), summary(lost)
        late = [o for o in outcomes if o.started > t_removed]
        assert late and all(o.status == 200 for o in late), summary(late)
        # The worker let go of the aborted requests' pages; the router is whole again.
        wait_pages_back(url, ("mixed-a",))
        assert set(members.members()) == {"mixed-a", "tokenizer0"}
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        members.stop_all()


def _num_requests(members: Members) -> dict[str, int]:
    """Requests the router routed through each tokenizer so far."""
    return {n: m["num_requests"] for n, m in members.members().items() if "num_requests" in m}


def _wait_in_flight(members: Members, name: str, timeout_s: float = 10.0) -> None:
    """Until the router has requests in flight through tokenizer `name`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if members.members()[name]["num_in_flight"] > 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"no request went through {name} in {timeout_s} s")


def _wait_removed(members: Members, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if name not in members.members():
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} still listed after {timeout_s} s: {members.members()}")
