"""The grammar's token bitmask: filled on the host from each constrained row's matcher, applied
to the logits on the device before sampling.

The bitmask is xgrammar's: [B, ceil(V / 32)] int32, bit j of word w allows token 32 w + j; an
unconstrained row is all ones. It is filled first thing when the sampling batch is built, before
anything waits for the device, so on a GPU the filling overlaps the forward pass still running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pdserve.worker.grammar import RequestGrammar

_batch_matcher: Any = None  # xgrammar.BatchGrammarMatcher: fills many rows on several threads


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(
    grammars: Sequence[RequestGrammar | None], vocab_size: int, pin_memory: bool = False
) -> torch.Tensor | None:
    """[B, ceil(V / 32)] int32 on the host: each constrained row's allowed next tokens, all ones
    for the others; None when no row is constrained. Waits for compiles still running."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    global _batch_matcher
    import xgrammar as xgr

    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher()
    bitmask = torch.full(
        (len(grammars), bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory
    )
    matchers = [grammars[i].matcher for i in rows]  # type: ignore[union-attr]
    _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, rows)
    return bitmask


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
