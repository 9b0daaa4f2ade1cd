"""Ports picked at launch (router port 0, the tests' clusters): below Linux's ephemeral range,
where no outgoing connection can take them between the pick and the bind, with room after the
router's port for its tcp inboxes."""

from __future__ import annotations

import socket

from pdserve.entrypoints import launch


def test_a_picked_port_block_is_free_and_below_the_ephemeral_range() -> None:
    for block in (1, 17):
        port = launch._free_port(block)
        low, high = launch._PICKED_PORTS
        assert low <= port and port + block <= high
        for p in range(port, port + block):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))


def test_a_taken_port_is_not_picked(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        assert not launch._can_bind(busy)
        monkeypatch.setattr(launch, "_PICKED_PORTS", (busy, busy + 2))  # only `busy` to pick
        port = launch._free_port()
        assert port != busy  # the range had nothing free: the OS's pick instead
