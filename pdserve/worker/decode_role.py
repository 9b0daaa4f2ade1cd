"""The decode worker's role: reserve pages for each request, ask a prefill worker for its KV, and
join it to the running batch once the KV has landed. The waiting is `scheduler/kv_handoff.py`'s;
this class performs its actions (who owns which page when: docs/ARCHITECTURE.md)."""

from __future__ import annotations

import logging
import time
from collections import deque

from pdserve import protocol
from pdserve.ipc import Outbox
from pdserve.kv_transfer.base import KVReceiver, TransferStats
from pdserve.scheduler.kv_handoff import (
    AbortPrefill,
    Action,
    Admit,
    EndRequest,
    KVHandoff,
    SendPrefillTask,
)
from pdserve.scheduler.request import Request
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.worker_core import WorkerCore
from pdserve.worker.worker_role import Handler, ReqMeta, decode_side_outputs, new_request

logger = logging.getLogger(__name__)


class DecodeRole:
    reports_finish = True

    def __init__(
        self,
        core: WorkerCore,
        receiver: KVReceiver,
        to_prefills: list[Outbox],
        decode_idx: int,
        timeout_s: float,
    ) -> None:
        self.core = core
        self.scheduler = core.scheduler
        self.receiver = receiver
        self.to_prefills = to_prefills
        self.decode_idx = decode_idx
        self.handshake = receiver.handshake()  # rides on every PrefillTask
        self.aborted_rids: deque[str] = deque(maxlen=4096)  # aborted before their request came
        self.handoff = KVHandoff(
            self.scheduler, timeout_s, receiver.needs_arrival, receiver.frees_on_cancel
        )

    def handlers(self) -> dict[type, Handler]:
        return {
            protocol.TokenizedReq: self.on_tokenized,
            protocol.KVReady: lambda msg: self._perform(self.handoff.on_kv_ready(msg)),
            protocol.KVFailed: lambda msg: self._perform(self.handoff.on_kv_failed(msg)),
        }

    def on_tokenized(self, msg: protocol.TokenizedReq) -> list[Request]:
        if msg.rid in self.aborted_rids:  # the router ended it already: nobody waits for it
            return []
        if msg.embed:  # no decode, no pages here: the prefill worker answers the tokenizer
            self.to_prefills[msg.prefill_idx].send(_embed_task(msg, self.decode_idx))
            return []
        meta = ReqMeta(msg.tokenizer_idx, num_emitted=1)  # token 0 goes from prefill directly
        req = new_request(msg, meta)
        decode_side_outputs(req)
        self.core.check_request(req)
        self.handoff.add(req, msg.prefill_idx)
        return []

    def on_abort(self, rid: str, message: str) -> list[Request]:
        if rid in self.handoff:
            return self._perform(self.handoff.on_abort(rid, message, time.monotonic()))
        if self.scheduler.abort(rid, message) is None:
            self.aborted_rids.append(rid)  # its TokenizedReq may still be on the way
        return []

    def rids(self) -> list[str]:
        return list(self.scheduler.requests) + self.handoff.rids

    def uses_lora(self, name: str) -> bool:
        held = any(req.lora_name == name for req in self.handoff.requests())
        return held or self.scheduler.lora_in_use(name)

    def before_step(self, now: float) -> list[Request]:
        """Reserve pages for queued requests, then take in what the transfers report."""
        touched = self._perform(self.handoff.reserve(now))
        actions = [a for rid in self.receiver.poll() for a in self.handoff.on_arrived(rid)]
        for failure in self.receiver.take_failures():
            actions += self.handoff.on_transfer_failed(failure.rid, failure.error, now)
        actions += self.handoff.expire(now)
        return touched + self._perform(actions)

    def after_step(self, touched: list[Request]) -> None:
        pass

    def _perform(self, actions: list[Action]) -> list[Request]:
        """Do what the handoff asks; returns the requests whose end goes to their client."""
        touched: list[Request] = []
        for action in actions:
            match action:
                case SendPrefillTask(req, prefill_idx, dst_pages):
                    self.receiver.expect(req.rid, dst_pages)  # before the prefill can send
                    self.to_prefills[prefill_idx].send(self._prefill_task(req, dst_pages))
                case Admit(req, ready):
                    self.scheduler.commit_transferred(req, ready)
                    if self.core.spec is not None and not req.is_finished:
                        self.core.spec.bootstrap(req, ready)  # EAGLE: from the prompt's end
                    if req.is_finished:  # its first token ended it
                        touched.append(req)
                case EndRequest(req, notify, is_pages_held):
                    self.receiver.cancel(req.rid)
                    held = " (pages held until the prefill lets go)" if is_pages_held else ""
                    logger.warning("request %s: %s%s", req.rid, req.finish.message, held)
                    if notify:
                        touched.append(req)
                case AbortPrefill(rid, prefill_idx):
                    self.to_prefills[prefill_idx].send(protocol.Abort(rid=rid))
        return touched

    def _prefill_task(self, req: Request, dst_pages: list[int]) -> protocol.PrefillTask:
        return protocol.PrefillTask(
            rid=req.rid,
            input_ids=req.prompt_ids,
            sampling=req.sampling.to_dict(),
            tokenizer_idx=req.user_data.tokenizer_idx,
            decode_idx=self.decode_idx,
            dst_pages=dst_pages,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            kv_handshake=self.handshake,
            priority=req.priority,
            **_extra_fields(req.outputs),
            lora_name=req.lora_name,
            mm=req.mm,  # images: the prefill encodes them; decode reads the M-RoPE delta
            spec_hidden_rows=self.core.spec.prompt_hidden_rows if self.core.spec else 0,
        )

    def has_work(self) -> bool:
        return self.handoff.has_work()

    @property
    def num_waiting(self) -> int:
        return self.handoff.num_waiting

    @property
    def transfer_stats(self) -> TransferStats | None:
        return None

    def close(self) -> None:
        self.receiver.close()


def _extra_fields(outputs: object) -> dict[str, object]:
    """What the prefill must compute beyond the first token (hidden states, prompt logprobs)."""
    if not isinstance(outputs, ExtraOutputs):
        return {}
    return {
        "return_hidden_states": outputs.return_hidden_states,
        "logprob_start_len": outputs.logprob_start_len,
    }


def _embed_task(msg: protocol.TokenizedReq, decode_idx: int) -> protocol.PrefillTask:
    """An embedding request, passed on to its prefill worker untouched (no pages reserved)."""
    return protocol.PrefillTask(
        rid=msg.rid,
        input_ids=msg.input_ids,
        sampling=msg.sampling,
        tokenizer_idx=msg.tokenizer_idx,
        decode_idx=decode_idx,
        dst_pages=[],
        priority=msg.priority,
        embed=True,
        mm=msg.mm,  # a multimodal embedding's images: the prefill encodes them
    )
