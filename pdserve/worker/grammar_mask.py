"""The grammar's token bitmask: filled on the host from each constrained row's matcher, applied
to the logits on the device before sampling.

The bitmask is xgrammar's: [B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j; an
unconstrained row is all ones. It is filled first thing when the sampling batch is built, before
anything waits for the device, so on a GPU the filling overlaps the forward pass still running.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pdserve.worker.grammar import RequestGrammar

# xgrammar.BatchGrammarMatcher on one thread: its thread pool costs more than it saves at these
# sizes (64 JSON-schema rows, 128k vocabulary: 0.2 ms on one thread, 0.8 ms on two, ~4 ms with
# its default of half the cores on the H200 host), and the fill already overlaps the device.
_batch_matcher: Any = None
_fill_pool: ThreadPoolExecutor | None = None  # fill_bitmask_async's thread, and its own matcher
_async_matcher: Any = None
_SWITCH_INTERVAL_S = 50e-6


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(
    grammars: Sequence[RequestGrammar | None],
    vocab_size: int,
    pin_memory: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """[B, ceil(V / 32)] int32 on the host: each constrained row's allowed next tokens, all ones
    for the others; None when no row is constrained. Waits for compiles still running.
    out: a host tensor of that shape and dtype to fill (returned) instead of a new one."""
    job = _prepare(grammars, vocab_size, pin_memory, out)
    if job is None:
        return None
    global _batch_matcher
    if _batch_matcher is None:
        _batch_matcher = _new_batch_matcher()
    bitmask, matchers, rows = job
    _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, rows)
    return bitmask


class FillJob:
    """Work queued on the fill thread (`_on_fill_thread`): `wait()` gives its result, and
    `hand_over()` returns once the thread is inside xgrammar with it."""

    def __init__(self, future: Future | None, started: threading.Event | None) -> None:
        self._future = future
        self._started = started
        self.ended: set[int] = set()  # an accept's matchers that terminated (their ids)

    def hand_over(self) -> None:
        """Block (letting go of the GIL) until the thread has entered xgrammar with this job: the
        thread runs the job's Python part now, not at the interpreter's next switch, and this
        thread resumes once xgrammar lets go of the GIL."""
        if self._started is not None:
            self._started.wait()

    def wait(self) -> Any:
        return self._future.result() if self._future is not None else None


def fill_bitmask_async(
    grammars: Sequence[RequestGrammar | None],
    vocab_size: int,
    out: torch.Tensor,
    hand_over: bool = True,
    after: FillJob | None = None,
) -> FillJob:
    """`fill_bitmask` into `out` on the fill thread while the caller goes on (xgrammar releases
    the GIL while it fills); the job's `wait()` gives the result. The matchers must not be
    advanced before then. after: the `accept_async` job queued just before (the matchers take
    its tokens first): a matcher that terminated there (its request has ended) keeps an all-ones
    row. hand_over: wait until the thread is inside xgrammar (`FillJob.hand_over`); False when the
    job is queued behind one the caller is about to wait for (that wait hands the GIL over too),
    so the caller hands over later."""
    job = _prepare(grammars, vocab_size, False, out, fill_ones=False)
    if job is None:
        return FillJob(None, None)
    bitmask, matchers, rows = job
    # Rows no matcher writes allow every token: all ones, written on the thread.
    ones = sorted(set(range(len(grammars))) - set(rows))

    def fill(matcher: Any, ready: Callable[[], None]) -> torch.Tensor:
        fill_matchers, fill_rows, ones_rows = matchers, rows, ones
        ended = after.ended if after is not None else ()
        if ended:
            live = [i for i, m in enumerate(matchers) if id(m) not in ended]
            fill_matchers = [matchers[i] for i in live]
            fill_rows = [rows[i] for i in live]
            ones_rows = sorted(set(ones) | (set(rows) - set(fill_rows)))
        if ones_rows:
            bitmask.numpy()[ones_rows] = -1
        ready()
        matcher.batch_fill_next_token_bitmask(fill_matchers, bitmask, fill_rows)
        return bitmask

    return _on_fill_thread(fill, hand_over)


def accept_async(grammars: list[RequestGrammar], token_ids: list[int]) -> FillJob:
    """Feed each grammar's matcher its token on the fill thread (xgrammar releases the GIL while
    it accepts), before any fill queued after this call; the job's `wait()` gives, per grammar,
    whether it took the token and whether it has terminated since (the job's `ended` then holds
    those matchers' ids, for a fill queued after it)."""
    import xgrammar as xgr

    matchers = [g.matcher for g in grammars]
    # Only a stop token can terminate a matcher (RequestGrammar.stop_ids).
    maybe_ended = [i for i, (g, t) in enumerate(zip(grammars, token_ids)) if t in g.stop_ids]
    ended: set[int] = set()

    def accept(_: Any, ready: Callable[[], None]) -> tuple[list[bool], list[bool]]:
        ready()
        accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, token_ids)
        terminated = [False] * len(matchers)
        for i in maybe_ended:
            terminated[i] = bool(matchers[i].is_terminated())
            if terminated[i]:
                ended.add(id(matchers[i]))
        return accepted, terminated

    job = _on_fill_thread(accept)
    job.ended = ended
    return job


def _on_fill_thread(
    work: Callable[[Any, Callable[[], None]], Any], hand_over: bool = True
) -> FillJob:
    """Run work(batch_matcher, ready) on the fill thread, after the jobs queued before it; work
    calls ready() just before it enters xgrammar (`FillJob.hand_over` returns then)."""
    global _fill_pool, _async_matcher
    if _fill_pool is None:
        _fill_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-fill")
        _async_matcher = _new_batch_matcher()
        # The fill thread takes the GIL back after each xgrammar call; while the main thread runs
        # Python it would wait for the interpreter's forced switch (5 ms by default): each of
        # its jobs took 5 ms beside a busy main thread, ~0.2 ms at 50 us.
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL_S))
    started = threading.Event()

    def run() -> Any:
        try:
            return work(_async_matcher, started.set)
        finally:
            started.set()  # a job that failed before ready() must not leave hand_over waiting

    job = FillJob(_fill_pool.submit(run), started)
    if hand_over:
        job.hand_over()
    return job


def _new_batch_matcher() -> Any:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=1)


def _prepare(
    grammars: Sequence[RequestGrammar | None],
    vocab_size: int,
    pin_memory: bool,
    out: torch.Tensor | None,
    fill_ones: bool = True,
) -> tuple[torch.Tensor, list[Any], list[int]] | None:
    """The bitmask (the unconstrained rows all ones unless not `fill_ones`; xgrammar writes the
    whole of a constrained row), the constrained rows' matchers and their row indices."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    shape = (len(grammars), bitmask_words(vocab_size))
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.int32):
        raise ValueError(f"out must be {list(shape)} int32, got {list(out.shape)} {out.dtype}")
    bitmask = torch.empty(shape, dtype=torch.int32, pin_memory=pin_memory) if out is None else out
    if fill_ones and len(rows) < len(grammars):
        # Only the unconstrained rows: a 64-row bitmask of a 128k vocabulary is 1 MB, whose
        # memset cost ~40 us of host time a step (this repository's CPU box) for nothing when
        # every row is constrained. numpy, not torch.full: its thread pool is slow on a busy host.
        ones = np.ones(len(grammars), dtype=bool)
        ones[rows] = False
        bitmask.numpy()[ones] = -1
    matchers = [grammars[i].matcher for i in rows]  # type: ignore[union-attr]
    return bitmask, matchers, rows


def allows_other_than(bitmask_row: torch.Tensor, token_ids: Sequence[int], vocab_size: int) -> bool:
    """Whether a row of the bitmask [ceil(V / 32)] int32 allows some token outside `token_ids`."""
    allowed = unpack_bitmask(bitmask_row.view(1, -1), vocab_size)[0]  # [V] bool
    ids = [t for t in token_ids if 0 <= t < vocab_size]
    if ids:
        allowed[torch.tensor(ids, dtype=torch.int64, device=allowed.device)] = False
    return bool(allowed.any())


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which tokens the bitmask [B, ceil(V / 32)] int32 allows (same device)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32] int32
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] float with every token the bitmask [B, ceil(V / 32)] int32 (same device)
    disallows set to -inf; a new tensor."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1])  # [B, V] bool
    return logits.masked_fill(~allowed, float("-inf"))
