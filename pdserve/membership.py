"""A worker's or tokenizer's side of dynamic membership (issue 19): applying the router's
`PeerTable` to the lists of outboxes a process reaches its peers by.

Messages name peers by index (`decode_idx`, `prefill_idx`, `tokenizer_idx`), and a process keeps
one outbox per index. When workers join and leave, the router sends every member the whole table
again; `update_outboxes` makes each list match it: new indices get an outbox, a changed address
a new one, and the slot of a worker that left (address "") a `NoPeer`, which drops what is sent
to it. Indices are never reused for another worker, so a late message never reaches a stranger.
`JoinOptions` are how a process started on its own (`pdserve worker|tokenizer --router`) joins.
The router itself is in `router/membership.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


@dataclass(frozen=True)
class JoinOptions:
    router_inbox: str  # tcp://HOST:PORT (the router's internal inbox: its HTTP port + 1)
    advertise_host: str  # where peers reach this process's sockets
    drain_timeout_s: float = 130.0  # past the router's default 120 s: it answers first
    register_interval_s: float = 2.0


class PeerOutbox(Protocol):
    address: str

    def send(self, msg: Any) -> None: ...

    def close(self) -> None: ...


class NoPeer:
    """The slot of a worker that left, or of one not known yet: sends are dropped and logged."""

    def __init__(self, address: str = "") -> None:
        self.address = address

    def send(self, msg: Any) -> None:
        rid = getattr(msg, "rid", "")
        logger.warning("%s for %r dropped: that peer left the cluster", type(msg).__name__, rid)

    def close(self) -> None:
        pass


def public_address(address: str, router_host: str) -> str:
    """`address` as a peer elsewhere dials it: a wildcard host (a socket bound on every
    interface) becomes `router_host`, the host the process reached the router at (the router's
    tokenizers run beside it)."""
    if not address.startswith("tcp://"):
        return address
    host, sep, port = address[len("tcp://") :].rpartition(":")
    if sep and host in _WILDCARD_HOSTS:
        return f"tcp://{router_host}:{port}"
    return address


def host_of(address: str) -> str:
    """The host part of a tcp:// address ("" for anything else)."""
    if not address.startswith("tcp://"):
        return ""
    return address[len("tcp://") :].rpartition(":")[0]


def update_outboxes(
    outboxes: list[Any],
    addresses: list[str],
    make: Callable[[str], PeerOutbox],
    own_address: str = "",
) -> None:
    """Make `outboxes[i]` reach `addresses[i]` for every i, in place (roles hold the same list
    object). "" (a worker that left) and `own_address` (this process: it never messages itself
    through a socket) get a NoPeer. The list never shrinks: indices stay valid."""
    for i, address in enumerate(addresses):
        current = outboxes[i] if i < len(outboxes) else None
        if current is not None and getattr(current, "address", None) == address:
            continue
        new: Any = NoPeer(address) if not address or address == own_address else make(address)
        if current is None:
            outboxes.append(new)
        else:
            current.close()
            outboxes[i] = new
