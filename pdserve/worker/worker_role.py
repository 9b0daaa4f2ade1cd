"""What a worker's role adds to the shared loop (receive, schedule, run, send): the contract that
the prefill, decode and mixed roles implement, and what the worker keeps beside each request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pdserve import protocol
from pdserve.config.sampling_params import SamplingParams
from pdserve.kv_transfer.base import TransferStats
from pdserve.scheduler.request import Request
from pdserve.worker.extra_outputs import ExtraOutputs

# A handler takes one message and returns the requests whose output or end the loop must send
# to their tokenizer.
Handler = Callable[[Any], list[Request]]


class KVPush(NamedTuple):
    """Prefill role: where a request's KV goes."""

    decode_idx: int
    dst_pages: list[int]  # in the decode worker's pool, one per prompt page


@dataclass
class ReqMeta:
    """What the worker keeps beside a Request (in Request.user_data)."""

    tokenizer_idx: int
    num_emitted: int = 0  # output tokens already sent to the tokenizer
    push: KVPush | None = None  # prefill role only


def new_request(
    msg: protocol.TokenizedReq | protocol.PrefillTask, meta: ReqMeta, prefill_only: bool = False
) -> Request:
    """The scheduler's Request for a message; ValueError for bad sampling parameters."""
    req = Request(
        rid=msg.rid,
        prompt_ids=list(msg.input_ids),
        sampling=SamplingParams.from_dict(msg.sampling),
        return_logprob=msg.return_logprob or msg.top_logprobs_num > 0,
        top_logprobs_num=msg.top_logprobs_num,
        prefill_only=prefill_only,
        priority=msg.priority,
        lora_name=msg.lora_name,
    )
    req.user_data = meta
    req.mm = msg.mm  # images (vision-language models)
    if msg.return_hidden_states or msg.logprob_start_len >= 0:
        req.outputs = ExtraOutputs(
            return_hidden_states=msg.return_hidden_states,
            logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num,
        )
    return req


def decode_side_outputs(req: Request) -> None:
    """Decode role: the prompt's part (its hidden states, its logprobs) comes from the prefill
    worker; this worker records only the generated tokens' hidden states."""
    if isinstance(req.outputs, ExtraOutputs):
        req.outputs.num_hidden_sent = len(req.prompt_ids)
        req.outputs.is_prompt_sent = True


class WorkerRole(Protocol):
    """A prefill, decode or mixed worker's part of the loop. The methods that return requests
    return those whose new tokens or end the loop sends to their tokenizer."""

    # False: only a request's first token goes out (a prefill worker; decode reports the end)
    reports_finish: bool

    def handlers(self) -> dict[type, Handler]:
        """The request messages this role takes (TokenizedReq, PrefillTask, KVReady, KVFailed)."""
        ...

    def on_abort(self, rid: str, message: str) -> list[Request]:
        """The router aborted rid (and has ended its client)."""
        ...

    def rids(self) -> list[str]:
        """Every request this worker holds state for."""
        ...

    def uses_lora(self, name: str) -> bool:
        """Whether a request held here runs under LoRA adapter `name` (unloading waits)."""
        ...

    def before_step(self, now: float) -> list[Request]:
        """Work due before the forward step (decode: admissions, arrived KV, timeouts)."""
        ...

    def after_step(self, touched: list[Request]) -> None:
        """Work due once the step's tokens are out (prefill: push KV, report to decode)."""
        ...

    def has_work(self) -> bool:
        """True when the loop must not sleep for this role's sake."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests held outside the scheduler (counted as queued in load reports)."""
        ...

    @property
    def transfer_stats(self) -> TransferStats | None:
        """The KV sender's numbers, for load reports (None: this role sends no KV)."""
        ...

    def close(self) -> None: ...
