"""The prefill worker's role: compute prompts for decode workers, then push each prompt's KV into
the decode worker's reserved pages and report KVReady, or KVFailed (who owns which page when:
docs/ARCHITECTURE.md, "KV page ownership")."""

from __future__ import annotations

import logging
from collections import deque

from pdserve import protocol
from pdserve.ipc import Outbox
from pdserve.kv_transfer.base import KVSender, Transfer, TransferStats
from pdserve.scheduler.request import Request, Status
from pdserve.worker.speculative.prompt_hidden import PromptHiddenCapture
from pdserve.worker.worker_core import WorkerCore
from pdserve.worker.worker_role import Handler, KVPush, ReqMeta, new_request

logger = logging.getLogger(__name__)


class PrefillRole:
    reports_finish = False  # only the first token goes out here; the decode worker reports the end

    def __init__(
        self, core: WorkerCore, sender: KVSender, to_decodes: list[Outbox], timeout_s: float
    ) -> None:
        self.core = core
        self.scheduler = core.scheduler
        self.sender = sender
        self.to_decodes = to_decodes
        self.timeout_s = timeout_s
        self.aborted_rids: deque[str] = deque(maxlen=4096)  # aborted before their task came

    def handlers(self) -> dict[type, Handler]:
        return {protocol.PrefillTask: self.on_prefill_task}

    def on_prefill_task(self, msg: protocol.PrefillTask) -> list[Request]:
        if msg.kv_handshake is not None:  # a no-op once this decode worker is connected
            self.sender.connect(msg.decode_idx, msg.kv_handshake)
        if msg.rid in self.aborted_rids:
            self.to_decodes[msg.decode_idx].send(protocol.KVFailed(msg.rid, "aborted", 400))
            return []
        if msg.embed:  # answered from here (WorkerProcess._emit): no KV goes to decode
            self.core.add_pooled(new_request(msg, ReqMeta(msg.tokenizer_idx)))
            return []
        meta = ReqMeta(msg.tokenizer_idx, push=KVPush(msg.decode_idx, list(msg.dst_pages)))
        req = new_request(msg, meta, prefill_only=True)
        if msg.spec_hidden_rows > 0:  # the decode worker's EAGLE head starts from these
            PromptHiddenCapture.for_request(req, msg.spec_hidden_rows)
        self.core.add(req)
        return []

    def on_abort(self, rid: str, message: str) -> list[Request]:
        req = self.scheduler.abort(rid, message)
        if req is None:
            self.aborted_rids.append(rid)  # its PrefillTask may still be on the way
            return []
        return [req]  # after_step tells the decode worker to let its pages go

    def rids(self) -> list[str]:
        return list(self.scheduler.requests)

    def uses_lora(self, name: str) -> bool:
        return self.scheduler.lora_in_use(name)

    def before_step(self, now: float) -> list[Request]:
        return []

    def after_step(self, touched: list[Request]) -> None:
        """Push the KV of every request whose prompt is done, all in one send (cuda_ipc copies
        them with one kernel and waits once); report the ones that failed here (aborted, too
        large, a failed step) so the decode worker ends them and frees their pages."""
        ready = []
        for req in touched:
            if req.user_data.push is None:
                continue  # an embedding request: its result went to the tokenizer
            if req.finish is not None:
                message = req.finish.message or "prefill failed"
                self._reply(req, protocol.KVFailed(req.rid, message, req.finish.status_code))
            elif req.status == Status.PREFILLED:
                ready.append(req)
        if not ready:
            return
        transfers = []
        for req in ready:
            push: KVPush = req.user_data.push
            src_pages = req.page_ids[: len(push.dst_pages)]
            transfers.append(Transfer(req.rid, push.decode_idx, src_pages, push.dst_pages))
        try:
            outcomes: list[object] = self.sender.send_many(transfers, timeout_s=self.timeout_s)
        except Exception as e:  # the whole call failed: every push fails, the worker goes on
            logger.exception("KV push of %d requests failed", len(transfers))
            outcomes = [e] * len(transfers)
        for req, outcome in zip(ready, outcomes, strict=True):
            self._finish_push(req, outcome)

    def _finish_push(self, req: Request, outcome: object) -> None:
        """Tell the decode worker how req's push went, and free its pages here."""
        reply: protocol.KVReady | protocol.KVFailed
        if isinstance(outcome, BaseException):
            decode_idx = req.user_data.push.decode_idx
            logger.error(
                "request %s: KV push to decode %d failed: %s", req.rid, decode_idx, outcome
            )
            reply = protocol.KVFailed(req.rid, f"KV transfer failed: {outcome}", 500)
        else:
            hidden = b"", [], ""
            if isinstance(req.spec_state, PromptHiddenCapture):
                hidden = req.spec_state.encode()
            reply = protocol.KVReady(
                spec_hidden=hidden[0],
                spec_hidden_shape=hidden[1],
                spec_hidden_dtype=hidden[2],
                rid=req.rid,
                first_token=req.output_ids[0],
                cached_tokens=req.num_cached_tokens,
                logprob=req.output_logprobs[0] if req.output_logprobs else None,
                top_logprobs=req.output_top_logprobs[0] if req.output_top_logprobs else None,
            )
        self.scheduler.release(req)  # the src pages: full ones stay in the prefix cache
        self._reply(req, reply)

    def _reply(self, req: Request, reply: protocol.KVReady | protocol.KVFailed) -> None:
        self.to_decodes[req.user_data.push.decode_idx].send(reply)

    def has_work(self) -> bool:
        return False

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def transfer_stats(self) -> TransferStats | None:
        return self.sender.stats

    def close(self) -> None:
        self.sender.close()
