"""A process's heartbeat: a thread that tells the router "alive" every interval.

The thread never waits on the process's own loop (a worker's model step, a tokenizer's event loop),
so the router's view of a process does not depend on how long one step runs: it goes silent only
when the process is gone or frozen as a whole.
"""

from __future__ import annotations

import logging
import os
import threading

import zmq

from pdserve import protocol
from pdserve.ipc import push_socket  # CURVE on tcp, as every peer socket

logger = logging.getLogger(__name__)

_SEND_HWM = 4  # heartbeats queued while the router is away: a stale one proves nothing


class HeartbeatSender:
    """`HeartbeatSender(name, router_inbox, interval_s).start()`; `stop()` when the process ends."""

    def __init__(self, name: str, router_inbox: str, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval_s={interval_s!r} is invalid: expected > 0")
        self.name = name
        self.router_inbox = router_inbox
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-heartbeat", daemon=True)

    def start(self) -> HeartbeatSender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1.0)

    def _run(self) -> None:
        # The socket lives in this thread only (ZeroMQ sockets are not thread-safe).
        sock = push_socket(zmq.Context.instance(), self.router_inbox, linger_ms=0, hwm=_SEND_HWM)
        beat = protocol.encode(protocol.Heartbeat(name=self.name, pid=os.getpid()))
        try:
            while True:
                try:
                    sock.send(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the router is away and the few queued beats say enough
                if self._stop.wait(self.interval_s):
                    return
        except zmq.ZMQError as e:  # the context was terminated: the process is ending
            logger.info("%s: heartbeat stopped: %s", self.name, e)
        finally:
            sock.close(0)
