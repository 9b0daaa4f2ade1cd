"""The router's side of dynamic membership (issue 19): workers and tokenizers that join
(`Register`), leave (`Leave`, on SIGTERM) or go silent while the cluster runs (`pdserve worker
--router`, `pdserve tokenizer --router`).

A joined worker's life as the router sees it:

- `Register` from a new name (or a new pid under a name whose process is gone): the next idx of
  its side (never reused), an outbox to it, in the registry as healthy but not routable; every
  member gets the new `PeerTable` (the newcomer: its welcome).
- a `PeerTableAck` of that version from every healthy member: routable, new requests may go to
  it (so no tokenizer or peer can get a message naming an idx it does not know yet).
- `Register` again (the same pid, every few seconds): a sign of life; the table again if it has
  not applied the latest.
- `Leave`: draining, routed nothing new; once no request depends on it (at most
  `drain_timeout_s`, then those left end with a 503) it is removed: every member gets the table
  without it, and it gets `Shutdown`.
- silent past the liveness timeout (killed, frozen, cut off): its requests end with a 500
  (router.py, as for any lost process), then it is removed.

A joined tokenizer lives the same life: its idx is the next `tokenizer_idx` (after the router's
own tokenizers, never reused), every member's table lists its inbox (workers send it tokens),
and it drains until no request routed through it is left.

A request a lost worker held is not retried elsewhere: its tokens may have reached the client
already, and a prompt that killed one worker should not go on to kill the next. It ends with an
error naming the worker; the client may retry it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from pdserve.config.router_spec import WorkerEntry
from pdserve.ipc import AsyncOutbox
from pdserve.membership import NoPeer
from pdserve.protocol import Leave, PeerTable, PeerTableAck, Register, Shutdown
from pdserve.router.worker_registry import ProcessState, TokenizerState

if TYPE_CHECKING:
    from pdserve.router.router import Router

logger = logging.getLogger(__name__)


class Membership:
    """Who is in the cluster: the peer table every member gets, acks, drains."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.version = 0
        # by idx, as messages name them; "" for a worker that left (idx never reused)
        self.decode_inboxes: list[str] = [""] * _num_slots(router, decode_side=True)
        self.prefill_inboxes: list[str] = [""] * _num_slots(router, decode_side=False)
        self.decode_kv: list[dict | None] = [None] * len(self.decode_inboxes)
        for w in router.spec.workers:  # workers the launcher started keep their idx
            (self.decode_inboxes if w.is_decode_side else self.prefill_inboxes)[w.idx] = w.inbox
        spec = router.spec  # the router's own tokenizers, then those that joined
        self.tokenizer_slots = list(spec.advertised_tokenizer_inboxes or spec.tokenizer_inboxes)
        self.acked: dict[str, int] = {}  # member name -> latest table version it applied
        self.joined_in: dict[str, int] = {}  # joined member -> the first table version with it
        self.draining: dict[str, float] = {}  # leaving member -> its deadline (monotonic)
        # (name, pid) of members that left by draining: a Register of theirs still on its way
        # must not bring them back
        self.has_left: deque[tuple[str, int]] = deque(maxlen=1024)
        # joined workers still loading the cluster's LoRA adapters: not routable until done
        self.loading_adapters: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def tokenizer_inboxes(self) -> list[str]:
        return list(self.tokenizer_slots)

    def is_member(self, name: str) -> bool:
        return name in self.joined_in

    def no_worker_message(self, role: str) -> str:
        """The 503 of a request no complete route exists for."""
        port = self.router.spec.inbox.rpartition(":")[2]
        return (
            f"no {role} worker has joined the cluster (or every one is starting, leaving or "
            f"lost): start one with `pdserve worker --role {role} --router "
            f"tcp://ROUTER_HOST:{port}`"
        )

    # ------------------------------------------------------------------ messages

    def on_message(self, msg: Register | PeerTableAck | Leave, now: float) -> None:
        if isinstance(msg, Register):
            self.on_register(msg, now)
        elif isinstance(msg, PeerTableAck):
            self.on_ack(msg)
        else:
            self.on_leave(msg, now)

    def on_register(self, msg: Register, now: float) -> None:
        if (msg.name, msg.pid) in self.has_left:
            return
        state = self.router.workers.process(msg.name)
        if state is not None and not self.is_member(msg.name):
            error = f"{msg.name!r} names a process the router started: give this one its own --name"
            self._refuse(msg, error)
            return
        if state is not None and state.live.pid == msg.pid:
            state.live.heard(now, msg.pid)  # its periodic Register: alive
            if self.acked.get(msg.name, -1) < self.version and msg.name not in self.draining:
                self.send_table(msg.name)
            return
        if state is not None and (state.is_healthy or msg.name in self.draining):
            self._refuse(
                msg,
                f"a {state.kind} named {msg.name!r} (pid {state.live.pid}) is in the "
                "cluster already: give each process its own --name",
            )
            return
        if state is not None:  # its process is gone (unresponsive, or exited)
            self.remove(msg.name, f"replaced by a new process (pid {msg.pid})")
        self._join(msg, now)

    def on_ack(self, msg: PeerTableAck) -> None:
        self.acked[msg.name] = max(self.acked.get(msg.name, 0), msg.version)
        self.update_routable()

    def on_leave(self, msg: Leave, now: float) -> None:
        state = self.router.workers.process(msg.name)
        if state is None or not self.is_member(msg.name) or state.live.pid != msg.pid:
            return  # unknown, started by the launcher, or an older process
        if msg.name in self.draining:
            return
        state.is_draining = True
        self.draining[msg.name] = now + self.router.spec.drain_timeout_s
        logger.info("%s is leaving: routed nothing new; draining its requests", msg.name)
        self.check_drains(now)

    # ------------------------------------------------------------------ joining

    def _join(self, msg: Register, now: float) -> None:
        if msg.role == "tokenizer":
            idx = self._add_tokenizer(msg, now)
        else:
            idx = self._add_worker(msg, now)
            if self.router.lora.adapters:  # it serves them before it gets traffic
                self.loading_adapters.add(msg.name)
                task = asyncio.get_running_loop().create_task(self._push_adapters(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.version += 1
        self.joined_in[msg.name] = self.version
        pages = f", {msg.num_pages} KV pages" if msg.role != "tokenizer" else ""
        logger.info(
            "%s joined: %s idx %d, pid %d, inbox %s%s",
            msg.name,
            msg.role,
            idx,
            msg.pid,
            msg.inbox,
            pages,
        )
        self.broadcast()

    def _add_worker(self, msg: Register, now: float) -> int:
        router = self.router
        is_decode_side = msg.role in ("decode", "mixed")
        slots = self.decode_inboxes if is_decode_side else self.prefill_inboxes
        idx = len(slots)
        slots.append(msg.inbox)
        if is_decode_side:
            self.decode_kv.append(msg.kv_handshake)
        entry = WorkerEntry(msg.name, msg.role, idx, msg.inbox)  # type: ignore[arg-type]
        router.to_workers[msg.name] = AsyncOutbox(msg.inbox, router.context)
        router.workers.add(entry, msg.pid, now)
        return idx

    def _add_tokenizer(self, msg: Register, now: float) -> int:
        """The next tokenizer_idx: GenerateReq goes to `router.to_tokenizers[idx]`, workers send
        its tokens to `tokenizer_inboxes[idx]` of the table."""
        router = self.router
        idx = len(router.to_tokenizers)
        self.tokenizer_slots.extend([""] * (idx - len(self.tokenizer_slots)))  # stay aligned
        self.tokenizer_slots.append(msg.inbox)
        router.to_tokenizers.append(AsyncOutbox(msg.inbox, router.context))
        router.workers.add_tokenizer(msg.name, idx, msg.pid, now)
        return idx

    def _refuse(self, msg: Register, error: str) -> None:
        logger.warning("registration of %s refused: %s", msg.name, error)
        outbox = AsyncOutbox(msg.inbox, self.router.context)
        outbox.send(PeerTable(self.version, [], [], [], for_name=msg.name, error=error))
        outbox.close()

    async def _push_adapters(self, msg: Register) -> None:
        """Load the cluster's LoRA adapters onto a worker that joined; one that cannot load them
        is taken out again and its registration refused with why (it keeps trying, as a
        refused worker does)."""
        error = await self.router.lora.push_to(msg.name)
        self.loading_adapters.discard(msg.name)
        state = self.router.workers.process(msg.name)
        if state is None or state.live.pid != msg.pid:
            return  # gone meanwhile
        if error is None:
            logger.info("%s loaded the cluster's LoRA adapters", msg.name)
            self.update_routable()
            return
        self.remove(msg.name, error)
        self._refuse(msg, f"could not load the cluster's {error}")

    def update_routable(self) -> None:
        """A joined worker gets traffic once every healthy member applied a table holding it
        (and it loaded the cluster's LoRA adapters)."""
        waiting = [
            p
            for p in self.router.workers.processes()
            if not p.is_routable and p.name not in self.loading_adapters
        ]
        if not waiting:
            return
        members = [p.name for p in self.router.workers.processes() if p.is_healthy]
        for state in waiting:
            needed = self.joined_in.get(state.name, 0)
            if all(self.acked.get(name, 0) >= needed for name in members):
                state.is_routable = True
                logger.info("%s is routable", state.name)

    # ------------------------------------------------------------------ leaving

    def check_drains(self, now: float) -> None:
        """Let go of the leaving workers no request depends on any more; at their deadline, end
        the requests still left."""
        for name, deadline in list(self.draining.items()):
            state = self.router.workers.process(name)
            if state is None:
                self.draining.pop(name, None)
                continue
            left = self._depending_on(state)
            if left and now < deadline:
                continue
            timeout = self.router.spec.drain_timeout_s
            for tracked in left:
                message = f"{name} left the cluster: its drain timeout ({timeout:g} s) passed"
                self.router.fail_request(tracked, message, 503)
            if isinstance(state, TokenizerState):
                self.router.to_tokenizers[state.idx].send(Shutdown())
            elif name in self.router.to_workers:
                self.router.to_workers[name].send(Shutdown())
            self.has_left.append((name, state.live.pid))
            self.remove(name, "drained")

    def _depending_on(self, state: ProcessState) -> list:
        """The tracked requests a member's leaving would end (router.py's table of losses)."""
        tracker = self.router.tracker
        if isinstance(state, TokenizerState):
            return tracker.lost_with_tokenizer(state.idx)
        return tracker.lost_with_worker(state.name, state.spec.role)

    def remove(self, name: str, reason: str) -> None:
        """Take a joined member out: its slot empties, every member gets the new table."""
        state = self.router.workers.remove(name)
        self.draining.pop(name, None)
        self.joined_in.pop(name, None)
        self.acked.pop(name, None)
        if isinstance(state, TokenizerState):
            self.tokenizer_slots[state.idx] = ""
            outbox = self.router.to_tokenizers[state.idx]
            self.router.to_tokenizers[state.idx] = NoPeer()  # type: ignore[call-overload]
            outbox.close()  # what was sent still leaves (linger)
            self._removed(name, reason)
            return
        outbox = self.router.to_workers.pop(name, None)
        if outbox is not None:
            outbox.close()  # what was sent still leaves (linger)
        if state is None:
            return
        if state.spec.is_decode_side:
            self.decode_inboxes[state.spec.idx] = ""
            self.decode_kv[state.spec.idx] = None
        else:
            self.prefill_inboxes[state.spec.idx] = ""
        self._removed(name, reason)

    def _removed(self, name: str, reason: str) -> None:
        self.version += 1
        logger.info("%s removed from the cluster: %s", name, reason)
        self.broadcast()
        self.update_routable()  # nobody waits for its ack any more

    # ------------------------------------------------------------------ tables

    def broadcast(self) -> None:
        for name in list(self.router.to_workers):
            self.send_table(name)
        for tokenizer in self.router.workers.tokenizers:
            self.send_table(tokenizer.name)

    def send_table(self, name: str) -> None:
        """The current table to one member (a restarted tokenizer, a worker behind)."""
        router = self.router
        state = router.workers.process(name)
        if state is None:
            return
        if name in router.to_workers:
            outbox = router.to_workers[name]
            idx = state.spec.idx  # type: ignore[union-attr]
        else:
            idx = state.idx  # type: ignore[union-attr]
            outbox = router.to_tokenizers[idx]
        outbox.send(
            PeerTable(
                version=self.version,
                decode_inboxes=list(self.decode_inboxes),
                prefill_inboxes=list(self.prefill_inboxes),
                tokenizer_inboxes=self.tokenizer_inboxes,
                decode_kv_handshakes=list(self.decode_kv),
                for_name=name,
                idx=idx,
            )
        )


def _num_slots(router: Router, decode_side: bool) -> int:
    idxs = [w.idx for w in router.spec.workers if w.is_decode_side == decode_side]
    return max(idxs) + 1 if idxs else 0


def refuse_without_membership(msg: Register | PeerTableAck | Leave, ctx: Any) -> None:
    """A router without membership tells a worker that tries to join why it never will."""
    logger.warning("%s from %s ignored: router.membership is off", type(msg).__name__, msg.name)
    if isinstance(msg, Register):
        outbox = AsyncOutbox(msg.inbox, ctx)
        error = "this router's topology has no `router: {membership: true}`"
        outbox.send(PeerTable(0, [], [], [], for_name=msg.name, error=error))
        outbox.close()
