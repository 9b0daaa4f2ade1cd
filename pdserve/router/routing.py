"""Routing policies: which worker of a side (decode/mixed, or prefill) gets the next request.

Each side has its own policy instance, so round robin cycles the two sides independently.
"""

from __future__ import annotations

from typing import Protocol

from pdserve.router.worker_registry import WorkerState


class RoutingPolicy(Protocol):
    def pick(self, candidates: list[WorkerState]) -> WorkerState:
        """One of `candidates` (non-empty, healthy, sorted by idx)."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self.num_picked = 0

    def pick(self, candidates: list[WorkerState]) -> WorkerState:
        chosen = candidates[self.num_picked % len(candidates)]
        self.num_picked += 1
        return chosen


class LeastLoad:
    """Fewest running + queued requests (plus those sent since the latest report);
    ties go to the one with more free KV pages, then to the lower idx."""

    def pick(self, candidates: list[WorkerState]) -> WorkerState:
        return min(candidates, key=lambda s: (s.load, -s.num_free_pages, s.spec.idx))


def make_policy(name: str) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    raise ValueError(f"routing_policy={name!r} is invalid: expected round_robin or least_load")
