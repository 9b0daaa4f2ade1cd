"""A worker process: the scheduler loop of one prefill, decode or mixed worker.

Loop: drain the inbox -> (decode) admit requests into reserved pages and ask prefill for their KV
-> one forward step -> send new tokens to the tokenizers -> (prefill) push KV and report KVReady
-> a load report to the router every interval.

KV page ownership across the two workers of one request (disaggregated):

| when                          | prefill worker                     | decode worker                   |
|-------------------------------|------------------------------------|---------------------------------|
| TokenizedReq admitted         | -                                  | allocates dst pages (reserved)  |
| PrefillTask computed          | owns src pages (pinned, PREFILLED) | reserved                        |
| KV pushed, KVReady sent       | releases src pages (to its cache)  | reserved, bytes landing         |
| KVReady (+ bytes) received    | -                                  | pages join the running request  |
| failure / timeout / abort     | releases src pages                 | frees dst pages, ends request   |
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pdserve import protocol
from pdserve.config.process_specs import KVTransferSpec, WorkerSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.ipc import Inbox, Outbox
from pdserve.protocol import Finish
from pdserve.scheduler.request import Request, Status

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 5


@dataclass
class ReqMeta:
    """What the worker process keeps beside a Request (in Request.user_data)."""

    tokenizer_idx: int
    peer_idx: int = 0  # prefill: the decode worker to push to; decode: the prefill worker asked
    dst_pages: list[int] = field(default_factory=list)
    num_emitted: int = 0  # output tokens already sent to the tokenizer
    deadline: float = 0.0  # decode: when waiting for KV gives up
    kv_ready: protocol.KVReady | None = None
    kv_arrived: bool = False


class WorkerProcess:
    def __init__(self, spec: WorkerSpec) -> None:
        from transformers import AutoTokenizer

        from pdserve.worker.worker_core import WorkerCore

        self.spec = spec
        self.name = spec.name
        self.role = spec.role
        tokenizer = AutoTokenizer.from_pretrained(spec.engine.model_path)
        self.core = WorkerCore(
            spec.engine, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        )
        self.scheduler = self.core.scheduler
        self.inbox = Inbox(spec.inbox)
        self.to_tokenizers = [Outbox(a) for a in spec.tokenizer_inboxes]
        self.to_router = Outbox(spec.router_inbox) if spec.router_inbox else None
        self.to_prefills = [Outbox(a) for a in spec.prefill_inboxes]
        self.to_decodes = [Outbox(a) for a in spec.decode_inboxes]
        self.kv_timeout_s = spec.kv.timeout_s
        self.report_interval_s = spec.report_interval_s
        self.pending_admission: list[Request] = []  # decode: waiting for pages
        self.orphans: dict[str, Request] = {}  # decode: ended, pages held until prefill lets go
        self.aborted_rids: deque[str] = deque(maxlen=4096)  # prefill: aborted before arrival
        self.kv_receiver = None
        self.kv_sender = None
        self.kv_handshake: dict[str, Any] | None = None
        self._setup_kv_transfer(spec.kv)
        self._last_report = 0.0
        self._running = True

    def _setup_kv_transfer(self, kv: KVTransferSpec) -> None:
        from pdserve import kv_transfer

        pool = self.core.runner.kv_pool
        if self.role == "decode":
            options = {"host": kv.host} if kv.host else {}
            self.kv_receiver = kv_transfer.make_receiver(kv.backend, pool, kv.address, **options)
            self.kv_handshake = self.kv_receiver.handshake()  # rides on every PrefillTask
        elif self.role == "prefill":
            self.kv_sender = kv_transfer.make_sender(kv.backend, pool)

    def ready_info(self) -> dict[str, Any]:
        return {"num_pages": self.core.runner.num_pages}

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        while self._running:
            self._drain_inbox()
            if self.role == "decode":
                self._admit_pending()
                self._collect_transfers()
            touched = self._step()
            self._emit(touched)
            if self.role == "prefill":
                self._push_prefilled(touched)
            self._maybe_report()
        self.close()

    def _step(self) -> list[Request]:
        """One forward step. If it fails (a bug, device out of memory), the requests it held end
        with an error and the worker keeps serving: a failure must not become a dead process."""
        try:
            return self.core.step()
        except Exception as e:
            logger.exception("worker %s: step failed; ending its running requests", self.name)
            message = f"internal error in worker {self.name}: {type(e).__name__}: {e}"
            failed = [r for r in self.scheduler.running if r.status == Status.RUNNING]
            for req in failed:
                self.scheduler.abort(req.rid, message)
            return failed

    def _drain_inbox(self) -> None:
        busy = self.core.has_work() or self.pending_admission or self._waiting_kv()
        first = self.inbox.recv(timeout_ms=0 if busy else _IDLE_POLL_MS)
        msgs = ([first] if first is not None else []) + self.inbox.recv_all()
        for msg in msgs:
            try:
                self._handle(msg)
            except Exception as e:  # a bad message must not kill the worker
                rid = getattr(msg, "rid", "?")
                logger.exception("worker %s: request %s failed: %s", self.name, rid, e)
                self._fail(msg, str(e))

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, protocol.TokenizedReq):
            self._on_tokenized(msg)
        elif isinstance(msg, protocol.PrefillTask):
            self._on_prefill_task(msg)
        elif isinstance(msg, protocol.KVReady):
            self._on_kv_ready(msg)
        elif isinstance(msg, protocol.Abort):
            self._on_abort(msg)
        elif isinstance(msg, protocol.FlushCache):
            if self.scheduler.cache is not None:
                self.scheduler.cache.reset()
        elif isinstance(msg, protocol.Shutdown):
            self._running = False
        else:
            logger.warning("worker %s: unexpected message %s", self.name, type(msg).__name__)

    # ------------------------------------------------------------------ intake

    def _new_request(
        self,
        rid: str,
        input_ids: list[int],
        sampling: dict[str, Any],
        return_logprob: bool,
        top_logprobs_num: int,
        meta: ReqMeta,
        prefill_only: bool = False,
    ) -> Request:
        req = Request(
            rid=rid,
            prompt_ids=list(input_ids),
            sampling=SamplingParams.from_dict(sampling),
            return_logprob=return_logprob or top_logprobs_num > 0,
            top_logprobs_num=top_logprobs_num,
            prefill_only=prefill_only,
        )
        req.user_data = meta
        return req

    def _on_tokenized(self, msg: protocol.TokenizedReq) -> None:
        meta = ReqMeta(tokenizer_idx=msg.tokenizer_idx, peer_idx=msg.prefill_idx)
        req = self._new_request(
            msg.rid, msg.input_ids, msg.sampling, msg.return_logprob, msg.top_logprobs_num, meta
        )
        if self.role == "decode":
            meta.num_emitted = 1  # the first token goes from prefill to the tokenizer directly
            self.scheduler.check_fits(req)
            self.pending_admission.append(req)
        else:
            self.core.add(req)

    def _on_prefill_task(self, msg: protocol.PrefillTask) -> None:
        if msg.kv_handshake is not None:  # a no-op once this decode worker is connected
            self.kv_sender.connect(msg.decode_idx, msg.kv_handshake)
        if msg.rid in self.aborted_rids:
            self.to_decodes[msg.decode_idx].send(
                protocol.KVReady(
                    rid=msg.rid, first_token=-1, cached_tokens=0, ok=False, error="aborted"
                )
            )
            return
        meta = ReqMeta(
            tokenizer_idx=msg.tokenizer_idx, peer_idx=msg.decode_idx, dst_pages=list(msg.dst_pages)
        )
        req = self._new_request(
            msg.rid,
            msg.input_ids,
            msg.sampling,
            msg.return_logprob,
            msg.top_logprobs_num,
            meta,
            prefill_only=True,
        )
        self.core.add(req)

    def _on_abort(self, msg: protocol.Abort) -> None:
        if msg.abort_all:
            rids = list(self.scheduler.requests) + [r.rid for r in self.pending_admission]
        else:
            rids = [msg.rid]
        for rid in rids:
            self.pending_admission = [r for r in self.pending_admission if r.rid != rid]
            req = self.scheduler.requests.get(rid)
            if req is None:
                if self.role == "prefill":
                    self.aborted_rids.append(rid)  # its PrefillTask may still be on the way
                continue
            if req.status == Status.WAITING_KV:
                self._drop_waiting_kv(req, msg.message, notify=False)
                continue
            self.scheduler.abort(rid, msg.message)
            if self.role == "prefill":  # decode holds pages for it: tell it to let them go
                self.to_decodes[req.user_data.peer_idx].send(
                    protocol.KVReady(
                        rid=rid, first_token=-1, cached_tokens=0, ok=False, error=msg.message
                    )
                )

    # ------------------------------------------------------------------ decode role

    def _admit_pending(self) -> None:
        while self.pending_admission:
            req = self.pending_admission[0]
            pages = self.scheduler.reserve_for_transfer(req)
            if pages is None:
                return  # backpressure: wait for pages to free up
            self.pending_admission.pop(0)
            meta: ReqMeta = req.user_data
            meta.deadline = time.monotonic() + self.kv_timeout_s
            self.kv_receiver.expect(req.rid, pages)
            self.to_prefills[meta.peer_idx].send(
                protocol.PrefillTask(
                    rid=req.rid,
                    input_ids=req.prompt_ids,
                    sampling=req.sampling.to_dict(),
                    tokenizer_idx=meta.tokenizer_idx,
                    decode_idx=self.spec.idx,
                    dst_pages=pages,
                    return_logprob=req.return_logprob,
                    top_logprobs_num=req.top_logprobs_num,
                    kv_handshake=self.kv_handshake,
                )
            )

    def _waiting_kv(self) -> bool:
        return any(r.status == Status.WAITING_KV for r in self.scheduler.running)

    def _on_kv_ready(self, msg: protocol.KVReady) -> None:
        if msg.rid in self.orphans:  # ended already; the prefill is done with its pages now
            self.scheduler.abort(self.orphans.pop(msg.rid).rid, "aborted")
            return
        req = self.scheduler.requests.get(msg.rid)
        if req is None or req.status != Status.WAITING_KV:
            return  # aborted meanwhile
        if not msg.ok:
            self._drop_waiting_kv(
                req, msg.error or "prefill failed", notify=True, prefill_done=True
            )
            return
        req.user_data.kv_ready = msg
        self._maybe_commit(req)

    def _collect_transfers(self) -> None:
        for rid in self.kv_receiver.poll():
            req = self.scheduler.requests.get(rid)
            if req is not None and req.status == Status.WAITING_KV and rid not in self.orphans:
                req.user_data.kv_arrived = True
                self._maybe_commit(req)
        for failure in self.kv_receiver.take_failures():
            req = self.scheduler.requests.get(failure.rid)
            if req is not None and req.status == Status.WAITING_KV:
                self._drop_waiting_kv(req, f"KV transfer failed: {failure.error}", notify=True)
        now = time.monotonic()
        for req in [r for r in self.scheduler.running if r.status == Status.WAITING_KV]:
            if req.rid in self.orphans:
                if now > req.user_data.deadline + self.kv_timeout_s:  # the prefill is gone
                    self.scheduler.abort(self.orphans.pop(req.rid).rid, "aborted")
            elif now > req.user_data.deadline:
                self.to_prefills[req.user_data.peer_idx].send(protocol.Abort(rid=req.rid))
                message = f"KV transfer timed out after {self.kv_timeout_s:.0f} s"
                self._drop_waiting_kv(req, message, notify=True)

    def _maybe_commit(self, req: Request) -> None:
        meta: ReqMeta = req.user_data
        if meta.kv_ready is None or (self.kv_receiver.needs_arrival and not meta.kv_arrived):
            return
        ready = meta.kv_ready
        self.scheduler.commit_transferred(
            req, ready.first_token, ready.cached_tokens, ready.logprob, ready.top_logprobs
        )
        if req.is_finished:  # the first token already ended it
            self._emit([req])

    def _drop_waiting_kv(
        self, req: Request, message: str, notify: bool, prefill_done: bool = False
    ) -> None:
        """End a request whose KV has not landed. With cuda_ipc the prefill may still be writing
        into its pages, so they stay reserved (an orphan) until its KVReady, or a second timeout,
        says the prefill is done with them."""
        logger.warning("worker %s: request %s: %s", self.name, req.rid, message)
        self.kv_receiver.cancel(req.rid)
        if prefill_done or self.kv_receiver.frees_on_cancel:
            self.scheduler.abort(req.rid, message)
        else:
            self.orphans[req.rid] = req
            req.finish = Finish.abort(message)
        if notify:  # the router asked for it otherwise, and already ended the client
            self._emit([req])

    # ------------------------------------------------------------------ prefill role

    def _push_prefilled(self, touched: list[Request]) -> None:
        for req in touched:
            meta: ReqMeta = req.user_data
            if req.finish is not None:  # failed here (e.g. too large): decode ends it
                message = req.finish.message or "prefill failed"
                self.to_decodes[meta.peer_idx].send(
                    protocol.KVReady(
                        rid=req.rid, first_token=-1, cached_tokens=0, ok=False, error=message
                    )
                )
                continue
            if req.status != Status.PREFILLED:
                continue
            num_pages = len(meta.dst_pages)
            ready = protocol.KVReady(
                rid=req.rid,
                first_token=req.output_ids[0],
                cached_tokens=req.num_cached_tokens,
                logprob=req.output_logprobs[0] if req.output_logprobs else None,
                top_logprobs=req.output_top_logprobs[0] if req.output_top_logprobs else None,
            )
            try:
                self.kv_sender.send(
                    req.rid,
                    meta.peer_idx,
                    req.page_ids[:num_pages],
                    meta.dst_pages,
                    timeout_s=self.kv_timeout_s,
                )
            except Exception as e:
                logger.exception("worker %s: KV push of %s failed", self.name, req.rid)
                ready.ok, ready.error = False, f"KV transfer failed: {e}"
            self.scheduler.release(req)
            self.to_decodes[meta.peer_idx].send(ready)

    # ------------------------------------------------------------------ outputs

    def _emit(self, touched: list[Request]) -> None:
        """Send each touched request's new tokens (and finish) to its tokenizer, batched."""
        batches: dict[int, protocol.TokenOut] = {}
        for req in touched:
            meta: ReqMeta = req.user_data
            new_ids = req.output_ids[meta.num_emitted :]
            finish = req.finish
            if self.role == "prefill":  # only the first token; decode reports the end
                new_ids, finish = new_ids[:1], None
            if not new_ids and finish is None:
                continue
            out = batches.setdefault(
                meta.tokenizer_idx,
                protocol.TokenOut(
                    rids=[], token_ids=[], first_idx=[], finish=[], logprobs=[], top_logprobs=[]
                ),
            )
            self._append_out(out, req, meta, new_ids, finish)
        for idx, out in batches.items():
            self.to_tokenizers[idx].send(out)

    def _append_out(
        self,
        out: protocol.TokenOut,
        req: Request,
        meta: ReqMeta,
        new_ids: list[int],
        finish: Finish | None,
    ) -> None:
        start = meta.num_emitted
        out.rids.append(req.rid)
        out.token_ids.append(list(new_ids))
        out.first_idx.append(start)
        out.finish.append(finish)
        end = start + len(new_ids)
        out.logprobs.append(req.output_logprobs[start:end] if req.return_logprob else [])
        out.top_logprobs.append(req.output_top_logprobs[start:end] if req.top_logprobs_num else [])
        out.prompt_tokens.append(len(req.prompt_ids))
        out.cached_tokens.append(req.num_cached_tokens)
        meta.num_emitted = end

    def _fail(self, msg: Any, message: str) -> None:
        """End the request a message was about with an error, wherever its client waits."""
        if isinstance(msg, protocol.PrefillTask):
            self.to_decodes[msg.decode_idx].send(
                protocol.KVReady(
                    rid=msg.rid, first_token=-1, cached_tokens=0, ok=False, error=message
                )
            )
        elif isinstance(msg, protocol.TokenizedReq):
            self.to_tokenizers[msg.tokenizer_idx].send(
                protocol.TokenOut(
                    rids=[msg.rid],
                    token_ids=[[]],
                    first_idx=[0],
                    finish=[Finish.abort(message)],
                )
            )

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if self.to_router is None or now - self._last_report < self.report_interval_s:
            return
        self._last_report = now
        stats = self.scheduler.stats()
        cache = self.scheduler.cache
        sender = self.kv_sender
        self.to_router.send(
            protocol.LoadReport(
                worker=self.name,
                role=self.role,
                num_running=stats["num_running"],
                num_queued=stats["num_queued"] + len(self.pending_admission),
                num_free_pages=stats["num_free_pages"] + stats["num_evictable_pages"],
                num_total_pages=stats["num_total_pages"],
                num_cached_pages=stats["num_cached_pages"],
                cache_hit_rate=cache.hit_rate if cache is not None else 0.0,
                step_time_ms=self.core.last_step_ms,
                kv_transfer_bytes=sender.stats.bytes_sent if sender else 0,
                kv_transfer_seconds=sender.stats.seconds if sender else 0.0,
                num_kv_transfers=sender.stats.num_transfers if sender else 0,
                num_preemptions=stats["num_preemptions"],
            )
        )

    def close(self) -> None:
        for closer in (self.kv_sender, self.kv_receiver):
            if closer is not None:
                closer.close()
        self.inbox.close()


def main(spec_dict: dict[str, Any]) -> None:
    """Process entry: build the worker, tell the launcher it is ready, then loop."""
    spec = WorkerSpec.from_dict(spec_dict)
    worker = WorkerProcess(spec)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "_running", False))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when children stop
    if spec.launcher_inbox:
        Outbox(spec.launcher_inbox).send(
            protocol.Ready(name=worker.name, info=worker.ready_info())
        )
    logger.info("worker %s (%s) ready", worker.name, worker.role)
    worker.run()
