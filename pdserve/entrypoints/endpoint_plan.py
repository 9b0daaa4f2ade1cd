"""Where each process of a cluster is reached: its inbox's bind and connect addresses, planned the
same way by every node's launcher."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.config.topology import Topology
from pdserve.config.topology_sections import WorkerPlan
from pdserve.ipc import new_ipc_address

_WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


@dataclass(frozen=True)
class Endpoint:
    """A process's inbox: the owner binds `bind`, its peers connect to `connect`."""

    bind: str
    connect: str


def plan_endpoints(
    topo: Topology, workers: list[WorkerPlan], socket_dir: str | None = None
) -> dict[str, Endpoint]:
    """Every inbox of the cluster, and each decode worker's KV socket (`<name>-kv`).

    One machine: fresh ipc:// paths. Several: tcp on each process's node, at router.port + 1 + k
    for the k-th name in a fixed order, so every node's launcher computes the same plan. With
    router.membership on one machine: tcp on bind_host too (the router at port + 1, tokenizer i
    at port + 2 + i), since workers elsewhere join through them.
    """
    names = ["router"] + [f"tokenizer{i}" for i in range(topo.tokenizer.replicas)]
    node_of: dict[str, str | None] = dict.fromkeys(names, topo.router.node)
    for w in workers:
        node_of[w.name] = w.node
        if w.role == "decode":
            node_of[f"{w.name}-kv"] = w.node
    if topo.router.membership and not topo.is_multi_node:
        host = topo.bind_host
        local = "127.0.0.1" if host in _WILDCARD_HOSTS else host  # where this node dials them
        return {
            name: Endpoint(f"tcp://{host}:{port}", f"tcp://{local}:{port}")
            for k, name in enumerate(node_of)
            for port in [topo.router.port + 1 + k]
        }
    if not topo.is_multi_node:
        return {
            name: Endpoint(a, a) for name in node_of for a in [new_ipc_address(name, socket_dir)]
        }
    plan = {}
    for k, (name, node) in enumerate(node_of.items()):
        port = topo.router.port + 1 + k
        plan[name] = Endpoint(
            f"tcp://{topo.bind_address(node)}:{port}", f"tcp://{topo.node_address(node)}:{port}"
        )
    return plan
