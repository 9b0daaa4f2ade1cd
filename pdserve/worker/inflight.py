"""The overlapped loop's bookkeeping (worker_core.py): a launched step whose tokens are not read
back yet, a request's output ids as the sampler sees them meanwhile, and read-back tokens being
fed to their grammar matchers on the fill thread."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pdserve.scheduler.finish_checker import grammar_finish
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, Scheduler
from pdserve.worker.device_copy import record_event
from pdserve.worker.grammar_mask import accept_async
from pdserve.worker.light_sampling import LightDraw


@dataclass
class InflightStep:
    """A launched step whose sampled tokens are not read back yet."""

    items: list[BatchItem]  # the rows that sample, in the order of token_ids
    epochs: list[int]  # each row's req.num_preemptions at launch: a preempted row is stale
    token_ids: torch.Tensor  # [R] int64, device
    host_ids: torch.Tensor  # [R] int64, host (pinned on CUDA): filled when `done` is reached
    done: torch.cuda.Event | None  # None on the CPU: everything already happened
    started: float  # perf_counter at launch
    draw: LightDraw | None = None  # a draw still to queue (its grammar bitmask being filled)
    row_of: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row_of = {id(item.req): i for i, item in enumerate(self.items)}

    def launch(self) -> None:
        """Queue a deferred draw into token_ids; called before anything reads its tokens or the
        next forward pass overwrites its logits (a CUDA graph's output buffer)."""
        if self.draw is None:
            return
        draw, self.draw = self.draw, None
        draw.launch(out=self.token_ids)
        self.read_back()

    def read_back(self) -> None:
        """Queue the tokens' copy to host_ids once they are sampled, and the event `done`."""
        self.host_ids.copy_(self.token_ids, non_blocking=True)
        if self.token_ids.is_cuda:
            self.done = record_event(self.token_ids.device)


class PendingLength(Sequence[int]):
    """A request's output ids as the sampler sees them while its last tokens are still being
    sampled: the right length (the seed's step, min_new_tokens), and no values for those tokens
    (rows that read values, penalties, never run overlapped)."""

    def __init__(self, known: list[int], num_pending: int) -> None:
        self._known = known
        self._len = len(known) + num_pending

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if not isinstance(index, slice) and index < 0:
            index += self._len
        if isinstance(index, slice) or not 0 <= index < len(self._known):
            raise LookupError("output token ids still being sampled are not on the host")
        return self._known[index]

    def __iter__(self) -> Iterator[int]:
        raise LookupError("output token ids still being sampled are not on the host")


class GrammarAccept:
    """Read-back tokens being fed to their requests' grammar matchers on the fill thread while
    the main thread records them (`Scheduler.process_sampled` with advance_grammar=False) and
    prepares the next draw, whose bitmask fill is queued behind the accept. `settle` applies
    the grammars' verdicts before the step returns, so a request ends on the same token and with
    the same reason as in the plain loop."""

    def __init__(self, records: list[tuple[Request, int]]) -> None:
        """records: (request, token) pairs read back this step, in order."""
        self.reqs: list[Request] = []
        tokens: list[int] = []
        for req, token in records:
            grammar = req.grammar
            # A grammar still compiling, or broken, is left to the inline check (it waits, or
            # ends the request).
            if grammar is not None and grammar.is_ready() and grammar.problem() is None:
                self.reqs.append(req)
                tokens.append(token)
        self.covered = {id(req) for req in self.reqs}
        self._tokens = tokens
        self.job = accept_async([r.grammar for r in self.reqs], tokens) if tokens else None

    def can_wait(self) -> bool:
        """Whether the verdicts may be applied a step later: no covered request has ended
        meanwhile (its finish reason, the length limit say, must yield to its grammar's before it
        is reported). A grammar that ends its request then ends it before the next step is
        scheduled, with the same tokens and reason; only the report comes a step later."""
        return all(req.finish is None for req in self.reqs)

    def settle(self, scheduler: Scheduler) -> list[Request]:
        """Wait for the matchers and end each request whose grammar has ended (or refused its
        token); returns those that had not ended before (a later settle reports them). Called
        once."""
        if self.job is None:
            return []
        accepted, terminated = self.job.wait()
        ended = []
        for i, (ok, done) in enumerate(zip(accepted, terminated)):
            if done or not ok:
                req = self.reqs[i]
                if req.finish is None:
                    ended.append(req)
                scheduler.end(req, grammar_finish(req, self._tokens[i], ok, done))
        return ended


class HostTokens:
    """The overlapped loop's read-back buffers: [num] int64 on the host (pinned on CUDA); two
    serve alternate steps."""

    def __init__(self, pin: bool) -> None:
        self._pin = pin
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def __call__(self, num: int) -> torch.Tensor:
        turn = self._turn
        self._turn ^= 1
        buf = self._bufs[turn]
        if buf is None or buf.numel() < num:
            buf = torch.empty(max(num, 256), dtype=torch.int64, pin_memory=self._pin)
            self._bufs[turn] = buf
        return buf[:num]
