"""What the router knows about the processes requests depend on: tokenizers and workers.

Every one of them has a `Liveness`: it is healthy while it is heard from (a `Heartbeat`, which a
thread of its own sends whatever its loop is doing, or a worker's `LoadReport`) within
`liveness_timeout_s`. A process the launcher saw exit (`mark_down`) stays down until a heartbeat from
a new process id says its restart is up: messages still queued from the dead one must not bring it
back. Workers also carry their latest load report, which routing reads. With membership,
workers and tokenizers are added and removed while the router runs (`add`, `add_tokenizer`,
`remove`: router/membership.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from pdserve.config.router_spec import WorkerEntry
from pdserve.protocol import Heartbeat, LoadReport

logger = logging.getLogger(__name__)

# starting: not heard from yet; unresponsive: silent past the timeout (its requests were ended);
# restarting: exited, the launcher starts it again; down: exited for good.
ProcessStatus = Literal["starting", "healthy", "unresponsive", "restarting", "down"]


@dataclass
class Liveness:
    status: ProcessStatus = "starting"
    heard_at: float | None = None  # time.monotonic() of its latest heartbeat or load report
    pid: int = 0  # the live process's id, from its heartbeats (0: none seen yet)
    dead_pids: set[int] = field(default_factory=set)  # exited: their late messages are ignored
    num_exits: int = 0

    @property
    def is_healthy(self) -> bool:
        return self.status == "healthy"

    @property
    def has_exited(self) -> bool:
        return self.status in ("restarting", "down")

    def heard(self, now: float, pid: int = 0) -> bool:
        """A heartbeat (pid) or a load report (pid 0) arrived; True when it just became healthy."""
        if pid in self.dead_pids:
            return False
        if self.has_exited and pid in (0, self.pid):
            return False  # sent before the exit: only a new process brings it back
        self.pid = pid or self.pid
        self.heard_at = now
        was_healthy = self.is_healthy
        self.status = "healthy"
        return not was_healthy

    def exited(self, pid: int, restarting: bool) -> bool:
        """The launcher saw process `pid` (0: the current one) exit; True when it was healthy."""
        pid = pid or self.pid
        if pid and self.pid and pid != self.pid and self.is_healthy:
            self.dead_pids.add(pid)  # an older process: its successor is up already
            return False
        was_healthy = self.is_healthy
        if pid:
            self.dead_pids.add(pid)
        self.num_exits += 1
        self.status = "restarting" if restarting else "down"
        return was_healthy

    def expire(self, now: float, timeout_s: float) -> bool:
        """True when it just became unresponsive (healthy, silent for more than timeout_s)."""
        if not self.is_healthy or self.heard_at is None or now - self.heard_at <= timeout_s:
            return False
        self.status = "unresponsive"
        return True


@dataclass
class WorkerState:
    spec: WorkerEntry
    live: Liveness = field(default_factory=Liveness)
    report: LoadReport | None = None
    report_at: float | None = None  # time.monotonic() of the latest report
    num_sent_since_report: int = 0  # requests routed here since that report (least_load)
    output_at: float = 0.0  # time.monotonic() of the latest output of a request decoding here
    # Joined at runtime (router/membership.py): not routable until every member knows it, and
    # routed nothing new once it is draining (leaving on SIGTERM).
    is_routable: bool = True
    is_draining: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.role

    @property
    def is_healthy(self) -> bool:
        return self.live.is_healthy

    @property
    def can_take_requests(self) -> bool:
        return self.live.is_healthy and self.is_routable and not self.is_draining

    @property
    def load(self) -> int:
        """Running + queued requests, counting the ones sent since the latest report."""
        reported = self.report.num_running + self.report.num_queued if self.report else 0
        return reported + self.num_sent_since_report

    @property
    def num_free_pages(self) -> int:
        return self.report.num_free_pages if self.report else 0


@dataclass
class TokenizerState:
    name: str
    idx: int  # GenerateReq goes to tokenizer_inboxes[idx]
    live: Liveness = field(default_factory=Liveness)
    kind: str = "tokenizer"
    # Joined at runtime (`pdserve tokenizer --router`): as WorkerState's
    is_routable: bool = True
    is_draining: bool = False
    num_requests: int = 0  # routed through it so far (/server_info)

    @property
    def is_healthy(self) -> bool:
        return self.live.is_healthy

    @property
    def can_take_requests(self) -> bool:
        return self.live.is_healthy and self.is_routable and not self.is_draining


ProcessState = WorkerState | TokenizerState


class WorkerRegistry:
    """Workers by name (iterating yields them, as routing and /metrics want) and tokenizers by idx."""

    def __init__(
        self,
        workers: tuple[WorkerEntry, ...],
        liveness_timeout_s: float,
        tokenizer_names: tuple[str, ...] = (),
    ) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self.states = {w.name: WorkerState(w) for w in workers}
        self.tokenizers = [TokenizerState(name, i) for i, name in enumerate(tokenizer_names)]
        self._processes: dict[str, ProcessState] = {t.name: t for t in self.tokenizers}
        self._processes.update(self.states)

    def __iter__(self) -> Iterator[WorkerState]:
        return iter(self.states.values())

    def get(self, name: str) -> WorkerState | None:
        return self.states.get(name)

    def process(self, name: str) -> ProcessState | None:
        return self._processes.get(name)

    def processes(self) -> list[ProcessState]:
        """Tokenizers, then workers."""
        return list(self._processes.values())

    def decode_side(self, healthy_only: bool = True) -> list[WorkerState]:
        return self._select(True, healthy_only)

    def prefill(self, healthy_only: bool = True) -> list[WorkerState]:
        return self._select(False, healthy_only)

    def healthy_tokenizers(self) -> list[TokenizerState]:
        """The tokenizers new requests may go to (healthy; joined ones routable, not leaving)."""
        return [t for t in self.tokenizers if t.can_take_requests]

    def _select(self, decode_side: bool, healthy_only: bool) -> list[WorkerState]:
        out = [
            s
            for s in self.states.values()
            if s.spec.is_decode_side == decode_side and (s.can_take_requests or not healthy_only)
        ]
        return sorted(out, key=lambda s: s.spec.idx)

    def all_healthy(self) -> bool:
        return all(p.is_healthy for p in self._processes.values())

    def on_heartbeat(self, beat: Heartbeat, now: float) -> ProcessState | None:
        """The process's state when this heartbeat made it healthy, else None."""
        state = self._processes.get(beat.name)
        if state is None:
            logger.debug("heartbeat from unknown process %r ignored", beat.name)
        elif state.live.heard(now, beat.pid):
            logger.info("%s (pid %d) is healthy", state.name, beat.pid)
            return state
        return None

    def add(self, entry: WorkerEntry, pid: int, now: float) -> WorkerState:
        """A worker that joined at runtime: healthy (it just spoke), not routable yet."""
        state = WorkerState(entry, is_routable=False)
        state.live.heard(now, pid)
        self.states[entry.name] = state
        self._processes[entry.name] = state
        return state

    def add_tokenizer(self, name: str, idx: int, pid: int, now: float) -> TokenizerState:
        """A tokenizer that joined at runtime: healthy (it just spoke), not routable yet."""
        state = TokenizerState(name, idx, is_routable=False)
        state.live.heard(now, pid)
        self.tokenizers.append(state)
        self._processes[name] = state
        return state

    def remove(self, name: str) -> ProcessState | None:
        """A worker or tokenizer that left the cluster: forgotten (its late messages are
        ignored)."""
        state = self._processes.pop(name, None)
        self.states.pop(name, None)
        if isinstance(state, TokenizerState):
            self.tokenizers.remove(state)
        return state

    def on_report(self, report: LoadReport, now: float) -> None:
        state = self.states.get(report.worker)
        if state is None:  # or one that left the cluster a moment ago
            logger.debug("load report from unknown worker %r ignored", report.worker)
            return
        if state.live.heard(now):
            logger.info("worker %s is healthy", state.name)
        if state.live.is_healthy:  # a report left by a dead process is no load to route on
            state.report = report
            state.report_at = now
            state.num_sent_since_report = 0

    def busy_since(self, since: float) -> set[str]:
        """Workers that produced output for some request after `since`."""
        return {s.name for s in self.states.values() if s.output_at > since}

    def note_output(self, name: str, now: float) -> None:
        state = self.states.get(name)
        if state is not None:
            state.output_at = now

    def note_sent(self, name: str) -> None:
        state = self.states.get(name)
        if state is not None:
            state.num_sent_since_report += 1

    def mark_down(self, name: str, pid: int = 0, restarting: bool = False) -> ProcessState | None:
        """The launcher saw `name` (process `pid`) exit; its state, None for an unknown name."""
        state = self._processes.get(name)
        if state is None:
            logger.warning("exit of unknown process %r ignored", name)
            return None
        state.live.exited(pid, restarting)
        if isinstance(state, WorkerState):
            state.report, state.num_sent_since_report = None, 0
        return state

    def expire(self, now: float) -> list[str]:
        """Mark processes that went silent unresponsive; the names that just did."""
        lost = []
        for state in self._processes.values():
            if state.live.expire(now, self.liveness_timeout_s):
                lost.append(state.name)
                logger.warning(
                    "%s was not heard from for %.1f s: unresponsive",
                    state.name,
                    now - (state.live.heard_at or now),
                )
        return lost
