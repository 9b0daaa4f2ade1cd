"""Keeps the launcher's children alive: a child that exits is reported, then restarted after a
backoff that doubles with each restart, at most `max_restarts` times within `restart_window_s`.

Generic over children: what an exit means for the rest of the cluster (tell the router, abort what
a dead router held) is the launcher's `on_exit` callback, and starting a process is its `respawn`.
A restarted child gets the same spec, so the same inbox address: its peers' sockets reconnect.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.config.topology_sections import SupervisionConfig

logger = logging.getLogger(__name__)

ChildKind = Literal["router", "tokenizer", "worker"]
MAX_BACKOFF_S = 60.0


@dataclass
class Child:
    """One child process and what it takes to start it again."""

    name: str
    kind: ChildKind
    proc: subprocess.Popen
    inbox: str
    spec: dict[str, Any] = field(default_factory=dict)  # msgpack-able; its stdin at each start
    env: dict[str, str] = field(default_factory=dict)  # on top of the launcher's environment
    restarts: list[float] = field(default_factory=list)  # time.monotonic() of each restart
    restart_at: float | None = None  # a restart is due then
    is_given_up: bool = False  # exited past the restart cap: stays down

    @property
    def is_running(self) -> bool:
        return self.proc.poll() is None


def restart_delay(config: SupervisionConfig, restarts: list[float], now: float) -> float | None:
    """Seconds to wait before restarting a child that just exited, or None to leave it down:
    the backoff doubles with each restart within the window, up to MAX_BACKOFF_S."""
    recent = [t for t in restarts if now - t < config.restart_window_s]
    if len(recent) >= config.max_restarts:
        return None
    return min(config.restart_backoff_s * 2 ** len(recent), MAX_BACKOFF_S)


class Supervisor:
    """`poll(now)` from the launcher's watcher thread, a few times a second."""

    def __init__(
        self,
        config: SupervisionConfig,
        respawn: Callable[[Child], subprocess.Popen],
        on_exit: Callable[[Child, bool], None],
    ) -> None:
        self.config = config
        self.respawn = respawn  # starts the child's process again from its spec
        self.on_exit = on_exit  # (child, will it be restarted): tell the rest of the cluster

    def poll(self, children: list[Child], now: float) -> None:
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child, now)
            elif not child.is_given_up and not child.is_running:
                self._exited(child, now)

    def _exited(self, child: Child, now: float) -> None:
        delay = restart_delay(self.config, child.restarts, now)
        code, pid = child.proc.returncode, child.proc.pid
        if delay is None:
            child.is_given_up = True
            logger.error(
                "%s (pid %d) exited with code %s; not restarting it: %d restart(s) within %g s "
                "already",
                child.name, pid, code, self.config.max_restarts, self.config.restart_window_s,
            )  # fmt: skip
        else:
            child.restart_at = now + delay
            logger.error(
                "%s (pid %d) exited with code %s; restarting it in %.1f s",
                child.name, pid, code, delay,
            )  # fmt: skip
        self.on_exit(child, delay is not None)

    def _restart(self, child: Child, now: float) -> None:
        child.restart_at = None
        child.restarts.append(now)
        try:
            child.proc = self.respawn(child)
        except Exception:  # counted as a restart; the next poll sees no process and decides
            logger.exception("%s: restart failed", child.name)
            return
        logger.info(
            "%s restarted (pid %d, restart %d within %g s)",
            child.name, child.proc.pid, len(child.restarts), self.config.restart_window_s,
        )  # fmt: skip
