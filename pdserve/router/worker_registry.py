"""What the router knows about each worker: its latest load report and whether it is healthy.

A worker is healthy while its load reports keep arriving (one within `report_timeout_s`). A worker
the launcher declared dead (`mark_dead`) stays unhealthy: a report still queued from before its
death must not bring it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdserve.config.router_spec import WorkerEntry
from pdserve.protocol import LoadReport

logger = logging.getLogger(__name__)


@dataclass
class WorkerState:
    spec: WorkerEntry
    report: LoadReport | None = None
    report_at: float | None = None  # time.monotonic() of the latest report
    num_sent_since_report: int = 0  # requests routed here since that report (least_load)
    is_dead: bool = False
    is_healthy: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def load(self) -> int:
        """Running + queued requests, counting the ones sent since the latest report."""
        reported = self.report.num_running + self.report.num_queued if self.report else 0
        return reported + self.num_sent_since_report

    @property
    def num_free_pages(self) -> int:
        return self.report.num_free_pages if self.report else 0


class WorkerRegistry:
    def __init__(self, workers: tuple[WorkerEntry, ...], report_timeout_s: float) -> None:
        self.report_timeout_s = report_timeout_s
        self.states = {w.name: WorkerState(w) for w in workers}

    def __iter__(self):
        return iter(self.states.values())

    def get(self, name: str) -> WorkerState | None:
        return self.states.get(name)

    def decode_side(self, healthy_only: bool = True) -> list[WorkerState]:
        return self._select(True, healthy_only)

    def prefill(self, healthy_only: bool = True) -> list[WorkerState]:
        return self._select(False, healthy_only)

    def _select(self, decode_side: bool, healthy_only: bool) -> list[WorkerState]:
        out = [
            s
            for s in self.states.values()
            if s.spec.is_decode_side == decode_side and (s.is_healthy or not healthy_only)
        ]
        return sorted(out, key=lambda s: s.spec.idx)

    def all_healthy(self) -> bool:
        return all(s.is_healthy for s in self.states.values())

    def on_report(self, report: LoadReport, now: float) -> None:
        state = self.states.get(report.worker)
        if state is None:
            logger.warning("load report from unknown worker %r ignored", report.worker)
            return
        state.report = report
        state.report_at = now
        state.num_sent_since_report = 0
        if not state.is_healthy and not state.is_dead:
            logger.info("worker %s is healthy", state.name)
            state.is_healthy = True

    def note_sent(self, name: str) -> None:
        state = self.states.get(name)
        if state is not None:
            state.num_sent_since_report += 1

    def mark_dead(self, name: str) -> bool:
        """Unhealthy for good; True when it was healthy until now."""
        state = self.states.get(name)
        if state is None:
            raise KeyError(f"unknown worker {name!r}")
        was_healthy = state.is_healthy
        state.is_dead = True
        state.is_healthy = False
        return was_healthy

    def expire(self, now: float) -> list[str]:
        """Mark workers whose reports stopped unhealthy; the names that just became unhealthy."""
        lost = []
        for state in self.states.values():
            if not state.is_healthy or state.report_at is None:
                continue
            if now - state.report_at > self.report_timeout_s:
                state.is_healthy = False
                lost.append(state.name)
                logger.warning(
                    "worker %s sent no load report for %.1f s: unhealthy",
                    state.name,
                    now - state.report_at,
                )
        return lost
