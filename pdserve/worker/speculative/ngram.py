"""Prompt-lookup drafting (`speculative_algorithm="NGRAM"`): the tokens that followed the most
recent earlier occurrence of the request's last n tokens, for the longest n that occurs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ngram_draft(
    token_ids: Sequence[int], num_drafts: int, min_window: int = 1, max_window: int = 12
) -> list[int]:
    """Up to num_drafts tokens continuing `token_ids` (prompt + output) by copying what followed
    the latest earlier match of its suffix; [] when no suffix of min_window..max_window tokens
    occurred before."""
    n_total = len(token_ids)
    if num_drafts <= 0 or n_total < min_window + 1:
        return []
    ids = np.asarray(token_ids, dtype=np.int64)  # [L]
    # Earlier positions holding the last token: every match of any suffix ends at one of them.
    ends = np.flatnonzero(ids[:-1] == ids[-1])  # [E]
    for window in range(min(max_window, n_total - 1), min_window - 1, -1):
        cand = ends[ends >= window - 1]  # [E'] ends with room for the window
        if not cand.size:
            continue
        offsets = np.arange(-window + 1, 1)  # [w]
        windows = ids[cand[:, None] + offsets[None, :]]  # [E', w]
        hits = cand[(windows == ids[n_total - window :]).all(axis=1)]
        if hits.size:
            start = int(hits[-1]) + 1  # the token after the latest match
            return ids[start : start + num_drafts].tolist()
    return []
