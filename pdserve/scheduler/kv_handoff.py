"""The decode side of the prefill -> decode handoff: the requests waiting for their KV, and what to
do at each event. No sockets, no tensors: the decode role feeds it events and performs its actions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pdserve.protocol import Finish, KVFailed, KVReady
from pdserve.scheduler.request import Request
from pdserve.scheduler.waiting_queue import WaitingQueue


class HandoffState(enum.Enum):
    QUEUED = "queued"  # no pages yet: waits for room, by priority then arrival (backpressure)
    RESERVED = "reserved"  # dst pages reserved and the PrefillTask sent; nothing back yet
    ANNOUNCED = "announced"  # KVReady is in; the bytes are still landing (needs_arrival backends)
    ARRIVED = "arrived"  # the bytes have landed; KVReady is not in yet
    HELD = "held"  # ended, but the sender may still write the pages: kept until it lets go


@dataclass(eq=False)
class Handoff:
    """One request in the table."""

    req: Request  # req.page_ids: its reserved dst pages (none while QUEUED)
    prefill_idx: int  # the prefill worker asked for its KV
    state: HandoffState = HandoffState.QUEUED
    deadline: float = math.inf  # in flight: when waiting gives up; HELD: when the pages go anyway
    ready: KVReady | None = None  # ANNOUNCED: the prefill's first token, kept until the bytes land


# ---------------------------------------------------------------- actions the decode role performs


class SendPrefillTask(NamedTuple):
    """Register the pages with the KV receiver (expect), then ask the prefill worker for the KV."""

    req: Request
    prefill_idx: int
    dst_pages: list[int]


class Admit(NamedTuple):
    """The KV is in the pages: the request joins the running batch (commit_transferred)."""

    req: Request
    ready: KVReady


class EndRequest(NamedTuple):
    """The request ended before its KV landed (req.finish says why): stop the receiver expecting
    bytes for it, and end the client's stream when `notify`."""

    req: Request
    notify: bool  # False when the router asked for the abort: it has ended the client already
    is_pages_held: bool  # True: the pages stay reserved (HELD) until the sender lets go


class AbortPrefill(NamedTuple):
    """Tell the prefill worker to drop the request: its KV is no longer wanted."""

    rid: str
    prefill_idx: int


Action = SendPrefillTask | Admit | EndRequest | AbortPrefill


class TransferPages(Protocol):
    """Where the handoff reserves dst pages and gives them back: the decode worker's Scheduler."""

    def check_fits(self, req: Request) -> None: ...

    def reserve_for_transfer(self, req: Request, num_in_flight: int) -> list[int] | None: ...

    def free_reserved(self, req: Request) -> None: ...


class KVHandoff:
    """The table of a decode worker's requests between TokenizedReq and the running batch.

    Each event returns the actions to perform; pages are reserved and freed here, through
    `pages`, and handed to the running batch with `Admit` (ownership, step by step:
    docs/ARCHITECTURE.md, "KV page ownership"). An entry leaves the table when it is admitted or
    when its pages are freed. `-` below: ignored (late, duplicate, or already handled).

    | state     | room     | KVReady    | KVFailed | arrived | receiver failed | abort    | deadline |
    |-----------|----------|------------|----------|---------|-----------------|----------|----------|
    | QUEUED    | RESERVED | -          | -        | -       | -               | end      | -        |
    | RESERVED  | -        | ANNOUNCED* | end+free | ARRIVED | end+pages       | end+pages| end+pages|
    | ANNOUNCED | -        | -          | end+free | admit   | end+free        | end+free | end+free |
    | ARRIVED   | -        | admit      | end+free | -       | -               | end+free | end+free |
    | HELD      | -        | free       | free     | -       | -               | -        | free     |

    *: admit at once when the backend has no bytes to wait for (not `needs_arrival`: cuda_ipc).
    end+pages: the pages are freed at once when `frees_on_cancel` (a cancelled transfer can no
    longer write them: tcp, nccl); otherwise (cuda_ipc writes into the pool directly) they are
    HELD until the prefill's KVReady or KVFailed, or one more timeout (the prefill is gone).
    A deadline ends the request with 504 and, unless its KVReady is in, tells the prefill to drop
    it (AbortPrefill). An abort does not notify the client: the router has ended it already.
    """

    def __init__(
        self, pages: TransferPages, timeout_s: float, needs_arrival: bool, frees_on_cancel: bool
    ) -> None:
        self._pages = pages
        self.timeout_s = timeout_s
        self.needs_arrival = needs_arrival  # admit only once the receiver reports the bytes too
        self.frees_on_cancel = frees_on_cancel
        self._entries: dict[str, Handoff] = {}
        # the QUEUED entries: higher priority first, then arrival order
        self._queue: WaitingQueue[Handoff] = WaitingQueue(lambda entry: entry.req.priority)

    # ------------------------------------------------------------------ queries

    def __contains__(self, rid: str) -> bool:
        return rid in self._entries

    def state_of(self, rid: str) -> HandoffState | None:
        entry = self._entries.get(rid)
        return entry.state if entry is not None else None

    @property
    def rids(self) -> list[str]:
        return list(self._entries)

    def requests(self) -> list[Request]:
        """Every request held here (waiting for pages or for its KV)."""
        return [e.req for e in self._entries.values()]

    @property
    def num_in_flight(self) -> int:
        """Entries holding pages (all but the queued ones)."""
        return len(self._entries) - len(self._queue)

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: queued for pages or waiting for their KV (not HELD)."""
        return sum(1 for e in self._entries.values() if e.state != HandoffState.HELD)

    def has_work(self) -> bool:
        """True while a request waits for pages or KV (held pages only wait for a deadline)."""
        return any(e.state != HandoffState.HELD for e in self._entries.values())

    def held_page_ids(self) -> list[int]:
        return [p for e in self._entries.values() for p in e.req.page_ids]

    # ------------------------------------------------------------------ events

    def add(self, req: Request, prefill_idx: int) -> None:
        """Queue a request for pages; ValueError if its id is in use or it can never fit."""
        if req.rid in self._entries:
            raise ValueError(f"request id {req.rid!r} is already in use")
        self._pages.check_fits(req)
        entry = Handoff(req, prefill_idx)
        self._entries[req.rid] = entry
        self._queue.append(entry)

    def reserve(self, now: float) -> list[Action]:
        """Reserve pages for queued requests in priority order, until one does not fit."""
        actions: list[Action] = []
        while self._queue:
            entry = self._queue[0]
            pages = self._pages.reserve_for_transfer(entry.req, self.num_in_flight)
            if pages is None:
                break
            self._queue.popleft()
            entry.state = HandoffState.RESERVED
            entry.deadline = now + self.timeout_s
            actions.append(SendPrefillTask(entry.req, entry.prefill_idx, list(pages)))
        return actions

    def on_kv_ready(self, ready: KVReady) -> list[Action]:
        """The prefill has written the pages and sends the prompt's first token."""
        entry = self._entries.get(ready.rid)
        if entry is None or entry.state in (HandoffState.QUEUED, HandoffState.ANNOUNCED):
            return []
        if entry.state == HandoffState.HELD:
            self._release(entry)  # the sender has let go
            return []
        if entry.state == HandoffState.RESERVED and self.needs_arrival:
            entry.state, entry.ready = HandoffState.ANNOUNCED, ready
            return []
        return self._admit(entry, ready)

    def on_kv_failed(self, failed: KVFailed) -> list[Action]:
        """The prefill gave up on the request and will not write its pages again."""
        entry = self._entries.get(failed.rid)
        if entry is None or entry.state == HandoffState.QUEUED:
            return []
        if entry.state == HandoffState.HELD:
            self._release(entry)
            return []
        return self._end_and_free(entry, Finish.abort(failed.error, failed.status_code), True)

    def on_arrived(self, rid: str) -> list[Action]:
        """The receiver reports that every byte of rid's KV has landed."""
        entry = self._entries.get(rid)
        if entry is None:
            return []
        if entry.state == HandoffState.RESERVED:
            entry.state = HandoffState.ARRIVED
            return []
        if entry.state == HandoffState.ANNOUNCED and entry.ready is not None:
            return self._admit(entry, entry.ready)
        return []

    def on_transfer_failed(self, rid: str, error: str, now: float) -> list[Action]:
        """The receiver saw rid's transfer fail (bad layout, broken peer) and drops its bytes."""
        entry = self._entries.get(rid)
        if entry is None or entry.state not in (HandoffState.RESERVED, HandoffState.ANNOUNCED):
            return []
        return self._end(entry, Finish.abort(f"KV transfer failed: {error}", 500), True, now)

    def on_abort(self, rid: str, message: str, now: float) -> list[Action]:
        """The router aborted the request (and has ended its client)."""
        entry = self._entries.get(rid)
        if entry is None or entry.state == HandoffState.HELD:
            return []
        return self._end(entry, Finish.abort(message), notify=False, now=now)

    def expire(self, now: float) -> list[Action]:
        """End requests whose KV is overdue; free held pages whose sender is presumed gone."""
        actions: list[Action] = []
        for entry in [e for e in self._entries.values() if now > e.deadline]:
            if entry.state == HandoffState.HELD:
                self._release(entry)
                continue
            if entry.state != HandoffState.ANNOUNCED:  # the prefill may still hold the request
                actions.append(AbortPrefill(entry.req.rid, entry.prefill_idx))
            message = f"KV transfer timed out after {self.timeout_s:g} s"
            actions += self._end(entry, Finish.abort(message, 504), notify=True, now=now)
        return actions

    # ------------------------------------------------------------------ transitions

    def _admit(self, entry: Handoff, ready: KVReady) -> list[Action]:
        del self._entries[entry.req.rid]  # its pages go with it, to the running batch
        return [Admit(entry.req, ready)]

    def _end(self, entry: Handoff, finish: Finish, notify: bool, now: float) -> list[Action]:
        """End the request; free its pages unless the sender may still write them."""
        if entry.state == HandoffState.RESERVED and not self.frees_on_cancel:
            entry.req.finish = finish
            entry.state = HandoffState.HELD
            entry.deadline = max(entry.deadline, now) + self.timeout_s
            return [EndRequest(entry.req, notify, is_pages_held=True)]
        return self._end_and_free(entry, finish, notify)

    def _end_and_free(self, entry: Handoff, finish: Finish, notify: bool) -> list[Action]:
        entry.req.finish = finish
        self._release(entry)
        return [EndRequest(entry.req, notify, is_pages_held=False)]

    def _release(self, entry: Handoff) -> None:
        """Drop the entry and free its pages (a queued one has none)."""
        del self._entries[entry.req.rid]
        if entry.state == HandoffState.QUEUED:
            self._queue.remove(entry)
        self._pages.free_reserved(entry.req)

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant: the queue is exactly the QUEUED
        entries, which hold no pages; no page is held twice; in-flight entries have a deadline."""
        queued = [e for e in self._entries.values() if e.state == HandoffState.QUEUED]
        if len(queued) != len(self._queue) or any(e not in queued for e in self._queue):
            raise RuntimeError("the queue and the QUEUED entries disagree")
        held = self.held_page_ids()
        if len(held) != len(set(held)):
            raise RuntimeError("a page is held by two entries")
        for rid, entry in self._entries.items():
            if entry.req.rid != rid:
                raise RuntimeError(f"entry {rid} holds request {entry.req.rid}")
            if entry.state == HandoffState.QUEUED and entry.req.page_ids:
                raise RuntimeError(f"request {rid}: queued but holds pages")
            if entry.state != HandoffState.QUEUED and not math.isfinite(entry.deadline):
                raise RuntimeError(f"request {rid}: {entry.state.value} without a deadline")
            if entry.state == HandoffState.ANNOUNCED and entry.ready is None:
                raise RuntimeError(f"request {rid}: announced without its KVReady")
