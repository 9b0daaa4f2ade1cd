"""Requests in flight: rid -> where it was routed and the queue its outputs go to.

One HTTP request becomes a `RequestGroup` of one or more sub-requests (n > 1, a list of prompts);
each sub-request has its own rid and choice index, and all of them feed the group's one queue,
so a route reads the merged stream in arrival order.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from pdserve.protocol import ReqOutput


def is_terminal(out: ReqOutput) -> bool:
    return out.finish is not None or out.error is not None


@dataclass
class RequestGroup:
    group_id: str
    rids: list[str]  # choice index -> rid
    created: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue[tuple[int, ReqOutput]] = field(default_factory=asyncio.Queue)
    finished: set[int] = field(default_factory=set)  # choice indices whose final output was read

    @property
    def num_choices(self) -> int:
        return len(self.rids)

    @property
    def is_done(self) -> bool:
        return len(self.finished) == len(self.rids)

    async def next_output(self) -> tuple[int, ReqOutput]:
        """The next (choice index, output); notes finished choices."""
        index, out = await self.queue.get()
        if is_terminal(out):
            self.finished.add(index)
        return index, out


@dataclass
class Tracked:
    """One sub-request in flight and the processes that hold state for it."""

    rid: str
    group: RequestGroup
    index: int
    tokenizer_idx: int
    decode: str  # worker name
    prefill: str | None  # worker name; None on a mixed worker
    lora_name: str | None = None  # its LoRA adapter (unloading it waits for this request)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    num_output_tokens: int = 0
    progress_at: float = field(default_factory=time.monotonic)  # created, or its latest output

    @property
    def has_left_prefill(self) -> bool:
        """A token from the decode worker arrived, so its KV is there: the prefill's part is done.
        The first token alone proves nothing: prefill sends it before it pushes the KV."""
        return self.prefill is None or self.num_output_tokens >= 2


class RequestTracker:
    def __init__(self) -> None:
        self.by_rid: dict[str, Tracked] = {}
        self.groups: dict[str, RequestGroup] = {}

    def __len__(self) -> int:
        return len(self.by_rid)

    def __contains__(self, rid: str) -> bool:
        return rid in self.by_rid

    def add(self, tracked: Tracked) -> None:
        if tracked.rid in self.by_rid:
            raise ValueError(f"rid {tracked.rid!r} is already in flight")
        self.by_rid[tracked.rid] = tracked
        self.groups[tracked.group.group_id] = tracked.group

    def get(self, rid: str) -> Tracked | None:
        return self.by_rid.get(rid)

    def pop(self, rid: str) -> Tracked | None:
        tracked = self.by_rid.pop(rid, None)
        if tracked is not None:
            group = tracked.group
            if not any(r in self.by_rid for r in group.rids):
                self.groups.pop(group.group_id, None)
        return tracked

    def rids_of(self, rid_or_group: str) -> list[str]:
        """In-flight rids named by a sub-request rid or by a group id (a /generate `rid`)."""
        if rid_or_group in self.by_rid:
            return [rid_or_group]
        group = self.groups.get(rid_or_group)
        return [r for r in group.rids if r in self.by_rid] if group else []

    def uses_lora(self, name: str) -> bool:
        return any(t.lora_name == name for t in self.by_rid.values())

    def lost_with_tokenizer(self, idx: int) -> list[Tracked]:
        return [t for t in self.by_rid.values() if t.tokenizer_idx == idx]

    def lost_with_worker(self, name: str, role: str) -> list[Tracked]:
        """The requests a dead worker takes down: all of a decode or mixed worker's; of a prefill
        worker's, those it has not handed to their decode worker yet (the others decode on)."""
        if role == "prefill":
            return [t for t in self.by_rid.values() if t.prefill == name and not t.has_left_prefill]
        return [t for t in self.by_rid.values() if t.decode == name]

    def older_than(self, created_before: float) -> list[Tracked]:
        return [t for t in self.by_rid.values() if t.created < created_before]

    def stalled_since(self, progress_before: float, busy: set[str]) -> list[Tracked]:
        """Requests with no output since `progress_before` (nor creation). One with no token yet
        is waiting its turn, not stalled, while its decode worker is `busy` (produced output for
        others since then): a long queue is no hang."""
        return [
            t
            for t in self.by_rid.values()
            if t.progress_at < progress_before and (t.num_output_tokens > 0 or t.decode not in busy)
        ]
