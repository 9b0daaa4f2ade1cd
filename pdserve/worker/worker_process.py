"""A worker process: the loop of one prefill, decode or mixed worker (receive, schedule and run a
step, send), with what differs by role in a role object (`prefill_role`, `decode_role`, `mixed_role`).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from pdserve import protocol
from pdserve.config.process_specs import WorkerSpec
from pdserve.fault_injection import FaultInjector
from pdserve.ipc import Inbox, Outbox
from pdserve.kv_transfer.base import TransferStats
from pdserve.profiling import profiled
from pdserve.protocol import Finish
from pdserve.scheduler.request import Request
from pdserve.worker.extra_outputs_wire import append_extra_outputs
from pdserve.worker.pooler import PoolState
from pdserve.worker.worker_core import WorkerCore
from pdserve.worker.worker_role import Handler, ReqMeta, WorkerRole

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 5


class WorkerProcess:
    def __init__(self, spec: WorkerSpec) -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self.name = spec.name
        tokenizer = AutoTokenizer.from_pretrained(spec.engine.model_path)
        # A prefill worker's requests end at their first token: nothing to overlap with.
        self.core = WorkerCore(
            spec.engine,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            overlap=spec.engine.overlap_schedule and spec.role != "prefill",
        )
        if self.core.tp_followers is not None:  # a lost rank takes the whole worker down
            from pdserve.worker.parallel.tp_launch import exit_process

            self.core.tp_followers.on_lost = exit_process
        self.scheduler = self.core.scheduler
        self.inbox = Inbox(spec.inbox)
        self.to_tokenizers = [Outbox(a) for a in spec.tokenizer_inboxes]
        self.to_router = Outbox(spec.router_inbox) if spec.router_inbox else None
        self.to_prefills = [Outbox(a) for a in spec.prefill_inboxes]
        self.to_decodes = [Outbox(a) for a in spec.decode_inboxes]
        self.faults = FaultInjector(spec.fault_injection, spec.name)  # tests; off by default
        self.role: WorkerRole = _ROLES[spec.role](self)
        self._handlers: dict[type, Handler] = {
            protocol.Abort: self._on_abort,
            protocol.FlushCache: self._on_flush_cache,
            protocol.LoraUpdate: self._on_lora_update,
            protocol.Shutdown: self._on_shutdown,
            **self.role.handlers(),
        }
        self._last_report = 0.0
        self._running = True

    def add_handler(self, msg_type: type, handler: Handler) -> None:
        """Handle `msg_type` too (a worker that joined a running router: worker/joining.py)."""
        self._handlers[msg_type] = handler

    def stop(self) -> None:
        """End the loop after this iteration (safe from a signal handler or another thread)."""
        self._running = False

    def ready_info(self) -> dict[str, Any]:
        return {"num_pages": self.core.runner.num_pages}

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        while self._running:
            touched = self._receive()
            touched += self.role.before_step(time.monotonic())
            touched += self._step()
            self._emit(touched)
            self.role.after_step(touched)
            self._maybe_report()
        self.close()

    def _receive(self) -> list[Request]:
        """Handle every message in the inbox (waiting a little first when idle)."""
        busy = self.core.has_work() or self.role.has_work()
        first = self.inbox.recv(timeout_ms=0 if busy else _IDLE_POLL_MS)
        msgs = ([first] if first is not None else []) + self.inbox.recv_all()
        touched: list[Request] = []
        for msg in msgs:
            handler = self._handlers.get(type(msg))
            if handler is None:
                logger.warning("worker %s: unexpected message %s", self.name, type(msg).__name__)
                continue
            problem = self._bad_peer_index(msg)
            if problem is not None:  # nobody to answer: the message names a peer we lack
                logger.warning("worker %s: %s dropped: %s", self.name, type(msg).__name__, problem)
                continue
            try:
                touched += handler(msg)
            except Exception as e:  # a bad message must not kill the worker
                rid = getattr(msg, "rid", "?")
                logger.exception("worker %s: request %s failed: %s", self.name, rid, e)
                self._fail(msg, str(e))
        return touched

    def _step(self) -> list[Request]:
        """One forward step. If it fails (a bug, device out of memory), the requests it held end
        with an error and the worker keeps serving: a failure must not become a dead process."""
        try:
            self.faults.before_step(self.core.has_work())
            return self.core.step()
        except Exception as e:
            if self.core.tp_followers is not None:
                # The ranks may be out of step now (one ran a collective the others did not):
                # end the worker rather than risk a hang; the router ends its requests.
                logger.exception("worker %s: tensor-parallel step failed; exiting", self.name)
                self.core.tp_followers.kill()
                raise
            logger.exception("worker %s: step failed; ending its running requests", self.name)
            message = f"internal error in worker {self.name}: {type(e).__name__}: {e}"
            failed = list(self.scheduler.running)
            for req in failed:
                self.scheduler.abort(req.rid, message, status_code=500)
            return failed

    # ------------------------------------------------------------------ messages for any role

    def _on_abort(self, msg: protocol.Abort) -> list[Request]:
        rids = self.role.rids() if msg.abort_all else [msg.rid]
        touched: list[Request] = []
        for rid in rids:
            touched += self.role.on_abort(rid, msg.message)
        return touched

    def _on_flush_cache(self, msg: protocol.FlushCache) -> list[Request]:
        self.scheduler.cache.reset()
        return []

    def _on_lora_update(self, msg: protocol.LoraUpdate) -> list[Request]:
        """Load or unload an adapter and tell the router how it went (it waits for every
        worker). Unloading an adapter that requests here still use is refused: the router
        retries until they end."""
        try:
            if msg.action == "load":
                loaded = self.core.load_lora(msg.lora_name, msg.lora_path)
            elif self.role.uses_lora(msg.lora_name):
                raise ValueError(f"LoRA adapter {msg.lora_name!r} is in use by requests in flight")
            else:
                loaded = self.core.unload_lora(msg.lora_name)
            done = protocol.LoraUpdateDone(msg.op_id, self.name, True, "", loaded)
        except ValueError as e:
            done = protocol.LoraUpdateDone(
                msg.op_id, self.name, False, str(e), self.core.lora_names
            )
        if self.to_router is not None:
            self.to_router.send(done)
        return []

    def _on_shutdown(self, msg: protocol.Shutdown) -> list[Request]:
        self._running = False
        return []

    def _bad_peer_index(self, msg: Any) -> str | None:
        """Why a message's peer indices (tokenizer, prefill, decode) name no peer of this worker,
        or None. Checked before any handler runs: a bad index would fail later, outside the
        per-message error handling, or leave nobody to tell."""
        peers = (
            ("tokenizer_idx", self.to_tokenizers),
            ("prefill_idx", self.to_prefills),
            ("decode_idx", self.to_decodes),
        )
        for key, outboxes in peers:
            idx = getattr(msg, key, None)
            if idx is None or (key == "prefill_idx" and not self.to_prefills):
                continue  # a mixed worker ignores prefill_idx
            if not 0 <= idx < len(outboxes):
                return f"{key}={idx} is invalid: expected 0..{len(outboxes) - 1}"
        return None

    def _fail(self, msg: Any, message: str) -> None:
        """End the request a message was about with an error, wherever its client waits."""
        if isinstance(msg, protocol.PrefillTask) and not msg.embed:
            self.to_decodes[msg.decode_idx].send(protocol.KVFailed(msg.rid, message, 400))
        elif isinstance(msg, (protocol.TokenizedReq, protocol.PrefillTask)):
            self.to_tokenizers[msg.tokenizer_idx].send(
                protocol.TokenOut(
                    rids=[msg.rid], token_ids=[[]], first_idx=[0], finish=[Finish.abort(message)]
                )
            )

    # ------------------------------------------------------------------ outputs

    def _emit(self, touched: list[Request]) -> None:
        """Send each touched request's new tokens (and finish) to its tokenizer, batched."""
        batches: dict[int, protocol.TokenOut] = {}
        for req in touched:
            meta: ReqMeta = req.user_data
            new_ids = req.output_ids[meta.num_emitted :]
            reports_finish = self.role.reports_finish or isinstance(req.outputs, PoolState)
            finish = req.finish if reports_finish else None
            if not new_ids and finish is None:
                continue
            out = batches.setdefault(
                meta.tokenizer_idx,
                protocol.TokenOut(
                    rids=[], token_ids=[], first_idx=[], finish=[], logprobs=[], top_logprobs=[]
                ),
            )
            _append_out(out, req, meta, new_ids, finish)
        for idx, out in batches.items():
            self.to_tokenizers[idx].send(out)

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if self.to_router is None or now - self._last_report < self.spec.report_interval_s:
            return
        self._last_report = now
        stats = self.scheduler.stats()
        spec = self.core.spec.stats if self.core.spec is not None else None
        transfers = self.role.transfer_stats or TransferStats()
        self.to_router.send(
            protocol.LoadReport(
                worker=self.name,
                role=self.spec.role,
                num_running=stats["num_running"],
                num_queued=stats["num_queued"] + self.role.num_waiting,
                num_free_pages=stats["num_free_pages"] + stats["num_evictable_pages"],
                num_total_pages=stats["num_total_pages"],
                num_cached_pages=stats["num_cached_pages"],
                cache_hit_rate=self.scheduler.cache.hit_rate,
                step_time_ms=self.core.last_step_ms,
                kv_transfer_bytes=transfers.bytes_sent,
                kv_transfer_seconds=transfers.seconds,
                num_kv_transfers=transfers.num_transfers,
                num_preemptions=stats["num_preemptions"],
                num_loaded_adapters=len(self.core.lora_names),
                num_adapter_slots_used=stats["num_adapter_slots_used"],
                num_spec_row_steps=spec.num_row_steps if spec is not None else 0,
                num_spec_tokens=spec.num_tokens if spec is not None else 0,
            )
        )

    def close(self) -> None:
        self.role.close()
        self.core.close()
        self.inbox.close()


def _append_out(
    out: protocol.TokenOut, req: Request, meta: ReqMeta, new_ids: list[int], finish: Finish | None
) -> None:
    start = meta.num_emitted
    end = start + len(new_ids)
    out.rids.append(req.rid)
    out.token_ids.append(list(new_ids))
    out.first_idx.append(start)
    out.finish.append(finish)
    out.logprobs.append(req.output_logprobs[start:end] if req.return_logprob else [])
    out.top_logprobs.append(req.output_top_logprobs[start:end] if req.top_logprobs_num else [])
    out.prompt_tokens.append(len(req.prompt_ids))
    out.spec_verify_ct.append(req.spec_verify_ct)
    out.cached_tokens.append(req.num_cached_tokens)
    append_extra_outputs(out, req, len(out.rids) - 1)
    meta.num_emitted = end


# ---------------------------------------------------------------------------- roles


def _mixed_role(worker: WorkerProcess) -> WorkerRole:
    from pdserve.worker.mixed_role import MixedRole

    return MixedRole(worker.core)


def _prefill_role(worker: WorkerProcess) -> WorkerRole:
    from pdserve import kv_transfer
    from pdserve.worker.prefill_role import PrefillRole

    kv = worker.spec.kv
    runner = worker.core.runner
    if runner.tp.is_parallel:  # each rank sends its own heads (worker/parallel/kv_direct.py)
        from pdserve.worker.parallel.kv_direct import make_tp_sender

        sender = make_tp_sender(kv.backend, runner)
    else:
        sender = kv_transfer.make_sender(kv.backend, runner.kv_pool)
    sender.faults = worker.faults
    return PrefillRole(worker.core, sender, worker.to_decodes, kv.timeout_s)


def _decode_role(worker: WorkerProcess) -> WorkerRole:
    from pdserve import kv_transfer
    from pdserve.worker.decode_role import DecodeRole

    kv = worker.spec.kv
    options = {"host": kv.host} if kv.host else {}
    runner = worker.core.runner
    if runner.tp.is_parallel:  # each rank lands its own heads (worker/parallel/kv_direct.py)
        from pdserve.worker.parallel.kv_direct import make_tp_receiver

        receiver = make_tp_receiver(kv.backend, runner, kv.address, **options)
    else:
        receiver = kv_transfer.make_receiver(kv.backend, runner.kv_pool, kv.address, **options)
    return DecodeRole(worker.core, receiver, worker.to_prefills, worker.spec.idx, kv.timeout_s)


_ROLES: dict[str, Callable[[WorkerProcess], WorkerRole]] = {
    "mixed": _mixed_role,
    "prefill": _prefill_role,
    "decode": _decode_role,
}


def main(spec_dict: dict[str, Any]) -> None:
    """Process entry: build the worker, tell the launcher it is ready, then loop."""
    spec = WorkerSpec.from_dict(spec_dict)
    worker = WorkerProcess(spec)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "_running", False))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when children stop
    if spec.launcher_inbox:
        Outbox(spec.launcher_inbox).send(protocol.Ready(name=worker.name, info=worker.ready_info()))
    logger.info("worker %s (%s) ready", worker.name, spec.role)
    from pdserve.heartbeat import HeartbeatSender  # here: this file's imports are in flux

    heartbeat = None
    if spec.router_inbox:  # from a thread: a long step never looks like a dead worker
        heartbeat = HeartbeatSender(worker.name, spec.router_inbox, spec.heartbeat_interval_s)
        heartbeat.start()
    try:
        with profiled(worker.name):  # PDSERVE_PROFILE_DIR: a diagnostic
            worker.run()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
