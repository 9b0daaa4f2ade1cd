"""A member's side of dynamic membership (pdserve/membership.py): a PeerTable applied to a list of
outboxes in place; and the topology of a router that workers join (router.membership)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import plan_endpoints
from pdserve.membership import NoPeer, public_address, update_outboxes


class _Box:
    def __init__(self, address: str) -> None:
        self.address = address
        self.is_closed = False

    def close(self) -> None:
        self.is_closed = True


def test_a_table_grows_replaces_and_empties_slots_in_place() -> None:
    boxes: list[Any] = []
    same_list = boxes
    update_outboxes(boxes, ["tcp://a:1", "tcp://b:1"], _Box)
    first = boxes[0]
    update_outboxes(boxes, ["tcp://a:1", "tcp://b:2", "", "tcp://me:1"], _Box, "tcp://me:1")
    assert boxes is same_list and boxes[0] is first  # unchanged slots keep their socket
    assert boxes[1].address == "tcp://b:2"
    assert isinstance(boxes[2], NoPeer) and isinstance(boxes[3], NoPeer)
    old = boxes[1]
    update_outboxes(boxes, ["tcp://a:1", ""], _Box)  # b left; the list never shrinks
    assert old.is_closed and isinstance(boxes[1], NoPeer) and len(boxes) == 4
    NoPeer().send(object())  # dropped, logged: never raises


def test_wildcard_hosts_become_the_routers_host() -> None:
    assert public_address("tcp://0.0.0.0:8002", "10.1.2.3") == "tcp://10.1.2.3:8002"
    assert public_address("tcp://[::]:8002", "router") == "tcp://router:8002"
    assert public_address("tcp://10.0.0.9:8002", "router") == "tcp://10.0.0.9:8002"
    assert public_address("ipc:///tmp/x", "router") == "ipc:///tmp/x"


def _topology(model: Path, **router: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "device": "cpu",
        "router": {"port": 9000, "membership": True, **router},
        "security": {"cluster_secret": "a-test-secret-for-membership"},
    }


def test_a_membership_topology_is_a_router_alone_on_tcp(tiny_llama: Path) -> None:
    topo = Topology.from_dict(_topology(tiny_llama, drain_timeout_s=30))
    assert topo.workers() == [] and topo.router.drain_timeout_s == 30
    ep = plan_endpoints(topo.resolved(), [])
    assert ep["router"].bind == "tcp://127.0.0.1:9001"
    assert ep["tokenizer0"].connect == "tcp://127.0.0.1:9002"
    wide = Topology.from_dict({**_topology(tiny_llama), "bind_host": "0.0.0.0"})
    ep = plan_endpoints(wide.resolved(), [])
    assert (ep["router"].bind, ep["router"].connect) == (
        "tcp://0.0.0.0:9001",
        "tcp://127.0.0.1:9001",
    )


def test_a_membership_topology_refuses_workers_and_a_missing_secret(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="router.membership=True"):
        Topology.from_dict({**_topology(tiny_llama), "decode": [{}], "prefill": [{}]})
    with pytest.raises(ValueError, match="drain_timeout_s"):
        Topology.from_dict(_topology(tiny_llama, drain_timeout_s=0))
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    no_secret = {**_topology(tiny_llama), "security": {}}
    with pytest.raises(
        ValueError, match="security.cluster_secret: missing: with router.membership"
    ):
        Topology.from_dict(no_secret).cluster_secret()
