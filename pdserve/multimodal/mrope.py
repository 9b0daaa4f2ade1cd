"""Qwen2-VL's M-RoPE positions: a (temporal, height, width) position per prompt token.

Text tokens take the same position on all three axes, counting on from the previous token; the
tokens of an image take their patch's (t, h, w) offset from where the image starts, and the text
after it resumes at that start plus the image's larger side. A video is an image of several
frame pairs whose temporal positions step by a time interval. Tokens after the prompt sit at
`index + delta` on all three axes (transformers' `rope_deltas`), so decode needs only `delta`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MropePositions(NamedTuple):
    positions: np.ndarray  # [3, prompt_len] int64
    delta: int  # a token at index i >= prompt_len is at position i + delta


def time_intervals(
    is_video: list[bool], second_per_grid_ts: list[float], tokens_per_second: float
) -> list[float]:
    """Per item, the temporal step between its frame pairs: Qwen2.5-VL's videos step by
    tokens_per_second * seconds per pair (float32, as transformers computes it); the rest by 1."""
    if not tokens_per_second:
        return [1.0] * len(is_video)
    return [
        float(np.float32(tokens_per_second) * np.float32(s)) if v else 1.0
        for v, s in zip(is_video, second_per_grid_ts)
    ]


def mrope_positions(
    input_ids: list[int],
    image_token_id: int,
    image_grid_thw: list[list[int]],
    spatial_merge_size: int,
    video_token_id: int = -1,
    time_intervals: list[float] | None = None,
) -> MropePositions:
    """The prompt's 3-D positions; the k-th run of image (or video) tokens is item k (t * h * w /
    m^2 tokens). A video's frame pairs sit `time_intervals[k]` apart on the temporal axis
    (Qwen2.5-VL: tokens_per_second * seconds per pair, floored as transformers does; 1 when not
    given). ValueError when the prompt's vision tokens do not match the grids."""
    m = spatial_merge_size
    ids = np.asarray(input_ids, dtype=np.int64)
    out = np.empty((3, len(ids)), dtype=np.int64)
    image_rows = np.flatnonzero((ids == image_token_id) | (ids == video_token_id))
    expected = sum(t * h * w // (m * m) for t, h, w in image_grid_thw)
    if len(image_rows) != expected:
        raise ValueError(
            f"the prompt holds {len(image_rows)} image tokens: expected {expected} for "
            f"{len(image_grid_thw)} image(s)"
        )
    intervals = time_intervals or [1.0] * len(image_grid_thw)
    idx, pos, used = 0, 0, 0
    for (t, h, w), interval in zip(image_grid_thw, intervals):
        start = int(image_rows[used])
        out[:, idx:start] = np.arange(pos, pos + start - idx)  # text before the image
        pos += start - idx
        gt, gh, gw = t, h // m, w // m
        # float32 as transformers computes it, then truncated
        times = (np.arange(gt, dtype=np.float32) * np.float32(interval)).astype(np.int64)
        tt, hh, ww = np.meshgrid(times, np.arange(gh), np.arange(gw), indexing="ij")
        n = gt * gh * gw
        if int(image_rows[used + n - 1]) != start + n - 1:
            raise ValueError(f"image tokens at {start}..: expected a run of {n} for one image")
        out[0, start : start + n] = tt.reshape(-1) + pos
        out[1, start : start + n] = hh.reshape(-1) + pos
        out[2, start : start + n] = ww.reshape(-1) + pos
        pos += max(gh, gw)
        idx = start + n
        used += n
    out[:, idx:] = np.arange(pos, pos + len(ids) - idx)
    delta = int(out.max()) + 1 - len(ids) if len(ids) else 0
    return MropePositions(out, delta)
