"""Pooling: a pooling model's prompt hidden states -> one vector per request (an embedding, or a
score head's logits), accumulated chunk by chunk so chunked prefill gives the same vector.

Kinds (ModelConfig.pooling): `last` (the last prompt token: decoder embedders and reward models),
`mean` (all prompt tokens), `cls` (the first). The prefix cache may skip only positions the kind
does not read: `first_needed_position`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pdserve.config.engine_config import PoolingKind
from pdserve.protocol import Finish
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import ScheduledBatch, Scheduler
from pdserve.worker.extra_outputs import ExtraOutputs

if TYPE_CHECKING:
    from pdserve.worker.model_runner import ForwardOutput


@dataclass
class PoolState:
    """One request's running pool (held in Request.outputs on a pooling model's worker)."""

    kind: PoolingKind
    total: torch.Tensor | None = None  # [hidden] float32: sum of rows (mean)
    first: torch.Tensor | None = None  # [hidden] float32: position 0 (cls)
    last: torch.Tensor | None = None  # [hidden] model dtype: the last prompt token
    embedding: list[float] | None = None  # the result, once the whole prompt is computed

    def first_needed_position(self) -> int | None:
        return 0 if self.kind in ("mean", "cls") else None

    def add(self, rows: torch.Tensor, start: int) -> None:
        """rows: [n, hidden] final-normed hidden states of positions start..start+n-1."""
        if self.kind == "mean":
            chunk = rows.float().sum(dim=0)
            # start 0 again: a preempted request recomputes its prompt from the beginning
            self.total = chunk if self.total is None or start == 0 else self.total + chunk
        if self.kind == "cls" and start == 0:
            self.first = rows[0].float()
        self.last = rows[-1]

    def result(
        self,
        prompt_len: int,
        normalize: bool,
        compute_scores: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> list[float]:
        """The request's output vector: pooled (and L2-normalized), or the score head's logits."""
        if compute_scores is not None:  # classification / reward: the head on the last token
            return compute_scores(self.last[None, :])[0].tolist()
        if self.kind == "mean":
            pooled = self.total / prompt_len
        elif self.kind == "cls":
            pooled = self.first
        else:
            pooled = self.last.float()
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.tolist()


def record_rows(
    batch: ScheduledBatch,
    out: ForwardOutput,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Hand each request that asked for rows its slice of the step's hidden states."""
    for item, row_start in zip(batch.items, out.row_starts):
        outputs = item.req.outputs
        rows = out.hidden[row_start : row_start + item.num_tokens]  # [n, hidden]
        if isinstance(outputs, PoolState):
            outputs.add(rows, item.start)
        elif isinstance(outputs, ExtraOutputs) and outputs.wants_rows:
            req = item.req
            outputs.record(rows, item.start, req.all_ids, len(req.prompt_ids), compute_logits)


def finish_pooled(
    reqs: list[Request],
    scheduler: Scheduler,
    normalize: bool,
    scores: Callable[[torch.Tensor], torch.Tensor] | None,
) -> list[Request]:
    """Pooling model: each request, its prompt done, gets its vector and ends."""
    for req in reqs:
        state: PoolState = req.outputs
        state.embedding = state.result(len(req.prompt_ids), normalize, scores)
        scheduler.end(req, Finish.stop(None))  # full pages stay in the prefix cache
    return reqs
