"""The router's state and sockets: routing, in-flight requests, worker health, aborts.

Wiring (built in `start`, one asyncio loop):
    from_peers       PULL  ReqOutput, TokenizeOut from tokenizers, LoadReport from workers, control;
                           Register, PeerTableAck, Leave (router/membership.py)
    to_tokenizers[i] PUSH  GenerateReq, Abort, TokenizeReq, DetokenizeReq (serving_tokenize.py);
                           PeerTable, Shutdown (membership: a joined tokenizer, appended at
                           runtime; its slot a NoPeer once it left)
    to_workers[name] PUSH  Abort, FlushCache, LoraUpdate (router/lora_adapters.py); PeerTable,
                           Shutdown (membership: a joined worker, added and removed at runtime)
    to_launcher      PUSH  Ready (once listening)

Every request ends: a final output from the tokenizer, or a synthetic one made here when the client
leaves (`cancel`), `/abort_request` (`abort`), a process it depends on is lost, it makes no progress
for `progress_timeout_s`, or it runs past `request_timeout_s`.

Which requests a lost process takes down (it exited, `ProcessExited` from the launcher, or went
silent: no heartbeat nor load report for `liveness_timeout_s`):

| lost process        | its requests that end with an error (500)                     |
|---------------------|---------------------------------------------------------------|
| tokenizer i         | every request routed through tokenizer i (joined ones too)    |
| decode/mixed worker | every request decoding (or waiting to) there                  |
| prefill worker      | those not handed over yet: no token from decode has arrived   |

Routing skips a lost process until it is heard from again (a restarted one: a new pid). What the
router reports about itself (readiness, /health, /server_info) is router_status.py's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import zmq
import zmq.asyncio

from pdserve.config.router_spec import RouterSpec
from pdserve.ipc import AsyncInbox, AsyncOutbox
from pdserve.protocol import (
    Abort,
    Finish,
    FlushCache,
    GenerateReq,
    Heartbeat,
    Leave,
    LoadReport,
    LoraUpdateDone,
    Message,
    PeerTableAck,
    ProcessExited,
    Ready,
    Register,
    ReqOutput,
    Shutdown,
    TokenizeOut,
    WorkerDied,
)
from pdserve.router import router_status
from pdserve.router.errors import APIError
from pdserve.router.lora_adapters import LoraRegistry
from pdserve.router.membership import Membership, refuse_without_membership
from pdserve.router.metrics import RouterMetrics
from pdserve.router.pending_replies import PendingReplies
from pdserve.router.request_tracker import RequestGroup, RequestTracker, Tracked, is_terminal
from pdserve.router.routing import make_policy
from pdserve.router.worker_registry import ProcessState, WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)


def finish_label(out: ReqOutput) -> str:
    """The `finish_reason` label of pdserve_requests_total for a final output."""
    if out.error is not None:
        return "error"
    if out.finish is None:
        return "stop"
    if out.finish.is_abort:
        return "error" if out.finish.is_error else "abort"
    return out.finish.kind


def abort_output(rid: str, message: str, status_code: int) -> ReqOutput:
    finish = Finish.abort(message, status_code)
    return ReqOutput(rid=rid, text_delta="", output_ids=[], finish=finish)


class Router:
    def __init__(self, spec: RouterSpec | dict[str, Any]) -> None:
        self.spec = spec if isinstance(spec, RouterSpec) else RouterSpec.from_dict(spec)
        tokenizer_names = self.spec.tokenizer_names or tuple(
            f"tokenizer{i}" for i in range(len(self.spec.tokenizer_inboxes))
        )
        self.workers = WorkerRegistry(
            self.spec.workers, self.spec.liveness_timeout_s, tokenizer_names
        )
        self.tracker = RequestTracker()
        self.replies = PendingReplies()  # /tokenize, /detokenize: answered by rid
        # adapters on every worker
        self.lora = LoraRegistry(self.spec, self.send_to_workers, self.tracker.uses_lora)
        self.metrics = RouterMetrics(
            self.spec.model_name, lambda: list(self.workers), self.workers.processes
        )
        self._decode_policy = make_policy(self.spec.routing_policy)
        self._prefill_policy = make_policy(self.spec.routing_policy)
        self._num_tokenizer_picks = 0
        self.is_started = False
        self.shutdown_requested = asyncio.Event()
        self.shutdown_grace_s = 5.0  # from the launcher's Shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.from_peers: AsyncInbox | None = None
        self.to_tokenizers: list[AsyncOutbox] = []
        self.to_workers: dict[str, AsyncOutbox] = {}
        # workers that join and leave at runtime (router/membership.py); None: a static cluster
        self.membership = Membership(self) if self.spec.membership else None

    @property
    def context(self) -> zmq.asyncio.Context | None:
        return self._ctx

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ctx = zmq.asyncio.Context()
        self.from_peers = AsyncInbox(self.spec.inbox, self._ctx)
        self.to_tokenizers = [AsyncOutbox(a, self._ctx) for a in self.spec.tokenizer_inboxes]
        self.to_workers = {w.name: AsyncOutbox(w.inbox, self._ctx) for w in self.spec.workers}
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="router-recv"),
            asyncio.create_task(self._check_loop(), name="router-check"),
        ]
        self.is_started = True
        logger.info("router started: inbox %s", self.spec.inbox)

    def send_ready(self, info: dict[str, Any] | None = None) -> None:
        """Tell the launcher the HTTP server is listening (call once, after it is)."""
        if not self.spec.launcher_inbox or self._ctx is None:
            return
        to_launcher = AsyncOutbox(self.spec.launcher_inbox, self._ctx)
        to_launcher.send(Ready(name="router", info=info or {}))
        to_launcher.close()

    async def stop(self) -> None:
        if not self.is_started:
            return
        self.is_started = False
        self.end_all("server is shutting down", 503)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=200)
        logger.info("router stopped")

    # ------------------------------------------------------------------ requests

    def submit(
        self, group_id: str, reqs: list[GenerateReq], route_keys: list[int] | None = None
    ) -> RequestGroup:
        """Route and send sub-requests; their outputs arrive on the returned group's queue.

        Sub-requests with equal `route_keys` (the n copies of one prompt) share a route, so the
        prefill worker's prefix cache serves the copies after the first.
        """
        if not self.is_started:
            raise APIError("the server is not ready", 503)
        rids = [r.rid for r in reqs]
        if len(set(rids)) != len(rids):
            raise APIError(f"request ids {rids} are not unique", 400, param="rid")
        if group_id in self.tracker.groups or any(r in self.tracker for r in rids):
            raise APIError(f"request id {group_id!r} is already in flight", 400, param="rid")
        keys = route_keys if route_keys is not None else list(range(len(reqs)))
        routes: dict[int, tuple[int, WorkerState, WorkerState | None]] = {}
        for key in keys:
            if key not in routes:
                routes[key] = self._route()  # all routes first: a 503 leaves nothing behind
        group = RequestGroup(group_id=group_id, rids=rids)
        try:
            for index, (req, key) in enumerate(zip(reqs, keys)):
                self._send(req, group, index, routes[key])
        except Exception as e:  # nothing may stay tracked: untrack it all, abort what was sent
            self.tracker.pop(req.rid)  # never sent (its rid may be what cannot be encoded)
            self.cancel(group, "the request could not be sent")
            if isinstance(e, (ValueError, TypeError, OverflowError)):  # the codec refused a value
                raise APIError(f"the request could not be encoded: {e}", 400) from None
            raise
        return group

    def _send(
        self,
        req: GenerateReq,
        group: RequestGroup,
        index: int,
        route: tuple[int, WorkerState, WorkerState | None],
    ) -> None:
        tok_idx, decode, prefill = route
        req.decode_idx = decode.spec.idx
        req.prefill_idx = prefill.spec.idx if prefill else 0
        req.max_context_len = self.spec.max_context_len
        prefill_name = prefill.name if prefill else None
        tracked = Tracked(req.rid, group, index, tok_idx, decode.name, prefill_name, req.lora_name)
        self.tracker.add(tracked)
        self.workers.note_sent(decode.name)
        if prefill_name:
            self.workers.note_sent(prefill_name)
        self.to_tokenizers[tok_idx].send(req)
        logger.debug("rid %s -> tokenizer %d, %s, %s", req.rid, tok_idx, prefill_name, decode.name)

    def _route(self) -> tuple[int, WorkerState, WorkerState | None]:
        decode_side = self.workers.decode_side()
        if not decode_side:
            raise APIError(self.no_worker_message("decode"), 503)
        decode = self._decode_policy.pick(decode_side)
        prefill = None
        if decode.spec.role == "decode":
            prefills = self.workers.prefill()
            if not prefills:
                raise APIError(self.no_worker_message("prefill"), 503)
            prefill = self._prefill_policy.pick(prefills)
        tokenizers = self.workers.healthy_tokenizers()
        if not tokenizers:
            raise APIError("no healthy tokenizer", 503)
        tokenizer = tokenizers[self._num_tokenizer_picks % len(tokenizers)]
        self._num_tokenizer_picks += 1
        tokenizer.num_requests += 1
        return tokenizer.idx, decode, prefill

    def no_worker_message(self, role: str) -> str:
        """The 503's message when no `role` worker can take a request."""
        if self.membership is None:
            return f"no healthy {role} worker"
        return self.membership.no_worker_message(role)

    def cancel(self, group: RequestGroup, message: str = "client disconnected") -> int:
        """Abort the group's unfinished sub-requests (the client is gone): nobody reads them."""
        num = 0
        for rid in group.rids:
            tracked = self.tracker.pop(rid)
            if tracked is None:
                continue
            self._send_aborts(tracked, message)
            self.metrics.observe_finish("abort", time.monotonic() - tracked.created, 0, 0, 0)
            logger.info("rid %s aborted: %s", rid, message)
            num += 1
        return num

    def abort(self, rid: str, message: str = "aborted by /abort_request") -> int:
        """Abort a request by sub-request rid or group id; the client gets an abort finish."""
        rids = self.tracker.rids_of(rid)
        for r in rids:
            self._fail(self.tracker.by_rid[r], message, 400)
        return len(rids)

    def abort_all(self, message: str = "aborted by /abort_request") -> int:
        return self.end_all(message, 400)

    def end_all(self, message: str, status_code: int) -> int:
        """End every request in flight: each client gets a final event with `message`."""
        rids = list(self.tracker.by_rid)
        for r in rids:
            self._fail(self.tracker.by_rid[r], message, status_code)
        return len(rids)

    def send_to_workers(self, msg: Message, only: set[str] | None = None) -> list[str]:
        """Send `msg` to every worker (or those named in `only`); returns their names."""
        names = [n for n in self.to_workers if only is None or n in only]
        for name in names:
            self.to_workers[name].send(msg)
        return names

    def flush_cache(self) -> int:
        for outbox in self.to_workers.values():
            outbox.send(FlushCache())
        return len(self.to_workers)

    # ------------------------------------------------------------------ health

    def mark_unhealthy(self, name: str, reason: str = "") -> None:
        """The process is gone for good: fail its requests, route around it.

        Safe to call from another thread."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.mark_unhealthy, name, reason)
            return
        self._on_exit(ProcessExited(name=name, pid=0, exit_code=0), reason or "lost")

    def _on_exit(self, msg: ProcessExited, reason: str) -> None:
        state = self.workers.mark_down(msg.name, msg.pid, msg.restarting)
        if state is None:
            return
        then = "; restarting it" if msg.restarting else ""
        logger.warning("%s marked down: %s%s", msg.name, reason, then)
        self.metrics.observe_process_exit(msg.name)
        self._fail_process(state, f"{msg.name} is unavailable: {reason}")

    def is_ready(self) -> bool:
        """Started, every process healthy, and with membership a complete route (router_status)."""
        return router_status.is_ready(self)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(is ready, the /health body): every process by name with its status."""
        return router_status.health(self)

    def can_serve(self) -> bool:
        """Started, and at least one complete route (a decode-side worker, and prefill if needed)."""
        return router_status.can_serve(self)

    def server_info(self) -> dict[str, Any]:
        """/server_info: the spec's facts, every worker's and tokenizer's state and load."""
        return router_status.server_info(self)

    def _fail_process(self, state: ProcessState, message: str) -> None:
        if isinstance(state, WorkerState):
            lost = self.tracker.lost_with_worker(state.name, state.spec.role)
        else:
            lost = self.tracker.lost_with_tokenizer(state.idx)
        for tracked in lost:
            self._fail(tracked, message, 500)

    def _fail(self, tracked: Tracked, message: str, status_code: int) -> None:
        self._send_aborts(tracked, message)
        logger.warning("rid %s ended: %s", tracked.rid, message)
        self._deliver(abort_output(tracked.rid, message, status_code))

    fail_request = _fail  # router/membership.py ends a drained worker's leftovers

    def _send_aborts(self, tracked: Tracked, message: str) -> None:
        abort = Abort(rid=tracked.rid, message=message)
        self.to_tokenizers[tracked.tokenizer_idx].send(abort)
        for name in (tracked.decode, tracked.prefill):
            outbox = self.to_workers.get(name) if name is not None else None
            if outbox is not None:  # None: a worker that left the cluster
                outbox.send(abort)

    # ------------------------------------------------------------------ inbox

    async def _recv_loop(self) -> None:
        """Read the inbox and hand each message on, yielding to the streams after each one.

        pyzmq's `await recv()` returns a frame already queued without yielding, so with a
        backlog a plain loop would deliver every queued output before any stream wrote one:
        clients got their tokens in clumps (all of a request's at its end, under load). Here
        each output is written out by its stream before the next frame is read, and frames
        already queued are read straight from the socket (the awaitable path costs more than
        decoding them)."""
        inbox = self.from_peers
        if inbox is None:
            raise RuntimeError("router inbox is not open: call start() first")
        while True:
            msg: Message | None = await inbox.recv()
            while msg is not None:
                try:
                    self._dispatch(msg)
                except Exception:
                    logger.exception("error handling %s", type(msg).__name__)
                await asyncio.sleep(0)
                msg = inbox.recv_queued()

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, ReqOutput):
            self._deliver(msg)
        elif isinstance(msg, Heartbeat):
            back = self.workers.on_heartbeat(msg, time.monotonic())
            if back is not None and self.membership is not None:  # a restart knows no peers
                self.membership.send_table(back.name)
        elif isinstance(msg, (Register, PeerTableAck, Leave)):
            self._on_membership(msg)
        elif isinstance(msg, LoadReport):
            self.workers.on_report(msg, time.monotonic())
        elif isinstance(msg, Abort):
            self._on_control_abort(msg)
        elif isinstance(msg, ProcessExited):
            self._on_exit(msg, f"the process exited (code {msg.exit_code})")
        elif isinstance(msg, WorkerDied):  # from a launcher older than ProcessExited
            self._on_exit(ProcessExited(msg.name, 0, msg.exit_code), f"code {msg.exit_code}")
        elif isinstance(msg, TokenizeOut):
            self.replies.deliver(msg)
        elif isinstance(msg, LoraUpdateDone):
            self.lora.deliver(msg)
        elif isinstance(msg, Shutdown):
            logger.info("shutdown requested (grace %.1f s)", msg.grace_s)
            self.shutdown_grace_s = msg.grace_s
            self.shutdown_requested.set()
        else:
            logger.warning("unexpected %s on the router inbox ignored", type(msg).__name__)

    def _on_membership(self, msg: Register | PeerTableAck | Leave) -> None:
        if self.membership is None:
            refuse_without_membership(msg, self._ctx)
        else:
            self.membership.on_message(msg, time.monotonic())

    def _on_control_abort(self, msg: Abort) -> None:
        if msg.abort_all:
            self.abort_all(msg.message)
        elif msg.rid:
            self.abort(msg.rid, msg.message)

    def _deliver(self, out: ReqOutput) -> None:
        tracked = self.tracker.get(out.rid)
        if tracked is None:
            return  # finished or aborted already: a late output
        now = time.monotonic()
        self._observe_tokens(tracked, out, now)
        tracked.progress_at = now
        self.workers.note_output(tracked.decode, now)
        tracked.group.queue.put_nowait((tracked.index, out))
        if is_terminal(out):
            self.tracker.pop(out.rid)
            tracked.prompt_tokens = max(tracked.prompt_tokens, out.prompt_tokens)
            self.metrics.observe_finish(
                finish_label(out),
                now - tracked.created,
                tracked.prompt_tokens,
                tracked.num_output_tokens,
                tracked.cached_tokens,
            )

    def _observe_tokens(self, tracked: Tracked, out: ReqOutput, now: float) -> None:
        tracked.prompt_tokens = max(tracked.prompt_tokens, out.prompt_tokens)
        tracked.cached_tokens = max(tracked.cached_tokens, out.cached_tokens)
        num_new = len(out.output_ids)
        tracked.num_output_tokens = max(
            tracked.num_output_tokens + num_new, out.completion_tokens
        )  # completion_tokens is cumulative; output_ids are per delta
        if num_new == 0:
            return
        if tracked.first_token_at is None:
            tracked.first_token_at = now
            self.metrics.observe_first_token(now - tracked.created)
        elif tracked.last_token_at is not None:
            self.metrics.observe_inter_token(now - tracked.last_token_at, num_new)
        tracked.last_token_at = now

    async def _check_loop(self) -> None:
        interval = min(0.5, self.spec.liveness_timeout_s / 4)
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            now = time.monotonic()
            # This loop ran late: the router itself was busy (a huge request list), so the
            # heartbeats waiting in its inbox are not read yet. Judge no one this round.
            lag_s = now - due
            due = now + interval
            if lag_s > interval:
                logger.warning("router loop held up for %.1f s: liveness check skipped", lag_s)
                continue
            try:
                self._check(now)
            except Exception:
                logger.exception("health check failed")

    def _check(self, now: float) -> None:
        timeout = self.spec.liveness_timeout_s
        for name in self.workers.expire(now):
            state = self.workers.process(name)
            message = f"{name} is unresponsive: no heartbeat and no load report for {timeout:g} s"
            if state is not None:
                self._fail_process(state, message)
            if self.membership is not None and self.membership.is_member(name):
                self.membership.remove(name, message)
        if self.membership is not None:
            self.membership.check_drains(now)
            self.membership.update_routable()
        if self.spec.progress_timeout_s > 0:
            limit = self.spec.progress_timeout_s
            busy = self.workers.busy_since(now - limit)
            for tracked in self.tracker.stalled_since(now - limit, busy):
                self._fail(tracked, f"request made no progress for {limit:g} s", 504)
        if self.spec.request_timeout_s > 0:
            for tracked in self.tracker.older_than(now - self.spec.request_timeout_s):
                limit = self.spec.request_timeout_s
                self._fail(tracked, f"request timed out after {limit:g} s", 504)
