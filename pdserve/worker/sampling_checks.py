"""Which rows of a sampling batch cannot be sampled with, and why: each such row ends its own
request while the rest of the batch goes on (worker/sampler.py `build_skipping_bad_rows`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pdserve.worker.sampler import SamplingRow

MAX_TOP_LOGPROBS = 20


class BadRow(NamedTuple):
    """A row whose own parameters cannot be sampled with, and why."""

    row_idx: int  # index into the rows given (and the logits' rows)
    message: str


class SamplingRowError(ValueError):
    """Some rows cannot be sampled with; the batch's other rows are fine. The worker ends just
    those requests (`bad_rows`) and samples the rest (see `build_skipping_bad_rows`)."""

    def __init__(self, bad_rows: list[BadRow]) -> None:
        if not bad_rows:
            raise ValueError("SamplingRowError needs at least one bad row")
        self.bad_rows = bad_rows
        super().__init__("; ".join(f"row {r.row_idx}: {r.message}" for r in bad_rows))

    @property
    def row_indices(self) -> list[int]:
        return [r.row_idx for r in self.bad_rows]


def find_bad_rows(
    rows: Sequence[SamplingRow], vocab_size: int, checked: bool = False
) -> list[BadRow]:
    """The rows whose parameters would fail the batch, with why. Checks what is cheap per step
    (numbers, logit_bias, stop and EOS ids); prompt and output ids are checked, vectorized,
    while the batch is built (`_ids_by_row`, also raising SamplingRowError). checked: the rows
    passed `row_problem` at admission; only their grammars are looked at."""
    bad = []
    for i, row in enumerate(rows):
        if checked:
            message = row.grammar.problem() if row.grammar is not None else None
        else:
            message = row_problem(row, vocab_size)
        if message is not None:
            bad.append(BadRow(i, message))
    return bad


def row_problem(row: SamplingRow, vocab_size: int) -> str | None:
    """Why `row` cannot be sampled with, or None."""
    p = row.params
    if not 0 <= row.top_logprobs_num <= MAX_TOP_LOGPROBS:
        return f"top_logprobs_num={row.top_logprobs_num} is invalid: expected 0..{MAX_TOP_LOGPROBS}"
    numbers = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty,
               p.presence_penalty)  # fmt: skip
    if not all(isinstance(x, float) and math.isfinite(x) for x in numbers):
        return f"sampling numbers {numbers} are invalid: expected finite floats"
    if p.top_p <= 0.0 or p.repetition_penalty <= 0.0:
        return f"top_p={p.top_p}, repetition_penalty={p.repetition_penalty}: expected both > 0"
    if not is_int(p.top_k) or (p.seed is not None and not is_int(p.seed)):
        return f"top_k={p.top_k!r}, seed={p.seed!r}: expected integers"
    if not all(is_int(t) and 0 <= t < vocab_size for t in p.logit_bias):
        return f"logit_bias has a token id outside [0, {vocab_size})"
    if not all(isinstance(v, float) and math.isfinite(v) for v in p.logit_bias.values()):
        return "logit_bias has a bias that is not a finite float"
    if len(row.output_ids) < p.min_new_tokens:  # these ids index the logits only then
        ids = (*p.stop_token_ids, *row.eos_token_ids)
        if not all(is_int(t) and 0 <= t < vocab_size for t in ids):
            return f"stop_token_ids/eos ids {list(ids)[:8]} are invalid: expected [0, {vocab_size})"
    if row.grammar is not None:
        return row.grammar.problem()  # its compile failed (waits for one still running)
    return None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
