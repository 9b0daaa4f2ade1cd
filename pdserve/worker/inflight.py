"""The overlapped loop's bookkeeping (worker_core.py): a launched step whose tokens are not read
back yet, and a request's output ids as the sampler sees them meanwhile."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pdserve.scheduler.scheduler import BatchItem
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
            self.done = torch.cuda.Event()
            self.done.record()


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
