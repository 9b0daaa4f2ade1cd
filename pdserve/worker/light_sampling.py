"""The worker's fast sampling path for "light" rows: greedy or temperature (with min-p and a seed),
under a grammar or not, and nothing else (no top-k / top-p, penalties, logit bias, logprobs, or
min_new_tokens bans still pending). No SamplingBatch is built: the host writes each row's
temperature, min-p and greedy flag, its two noise keys, and the rows' grammar bitmask straight
into pinned memory (one device copy each, not waited for), and the device draws every row's token
in one race kernel that reads the bitmask beside the logits (worker/race_sampling.py).

A seeded row's keys come from (seed, step) as the SamplingBatch's do, so it draws the same token
on either path (up to float rounding between two nearly tied tokens); unseeded rows take keys
from the worker's own generator.
"""

from __future__ import annotations

import functools
import operator
import sys
from collections.abc import Callable

import numpy as np
import torch

from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.device_copy import host_buffer
from pdserve.worker.draw_graphs import (
    DrawGraphs,
    DrawLayout,
    draw_from_bytes,
    mask_view,
    packed,
    packed_bytes,
)
from pdserve.worker.grammar_mask import FillJob, bitmask_words, fill_bitmask, fill_bitmask_async
from pdserve.worker.race_sampling import greedy_draw
from pdserve.worker.sampling_noise import MASK64, split_keys, splitmix64, splitmix64_array


def is_light(req: Request) -> bool:
    """Whether req's next token can be drawn on the fast path."""
    p = req.sampling
    if not p.is_light or req.return_logprob or req.top_logprobs_num > 0:
        return False
    if req.checked_sampling is not p:  # its numbers were not validated at admission
        return False
    # Before min_new_tokens, EOS (unless ignored) and stop ids are banned this step.
    if not p.min_new_tokens_bans:
        return True
    return len(req.output_ids) + req.num_inflight >= p.min_new_tokens


class LightSampler:
    def __init__(self, seed: int, graphs: DrawGraphs | None = None) -> None:
        self._rng = np.random.default_rng(seed)  # the unseeded rows' keys
        self._rows: _BatchRows | None = None  # the last batch's rows
        self.graphs = graphs  # draws over a decode graph's logits replay (worker/draw_graphs.py)

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """[R] int64 on the device: each row's argmax (every row plain greedy), replayed from a
        graph over a decode graph's logits."""
        rows = self.graphs.rows_for(logits) if self.graphs is not None else None
        if rows is None:
            return greedy_draw(logits)
        return self.graphs.draw(logits, DrawLayout(rows, 0, 0, False), None)

    def sample(self, logits: torch.Tensor, items: list[BatchItem]) -> torch.Tensor | None:
        """[R] int64 on the device: one token per row of logits [R, V]; every item is light
        (`is_light`). None when some row's grammar failed to compile: the general path ends that
        request alone."""
        draw = self.prepare(logits, items, background=False)
        return draw.launch() if draw is not None else None

    def prepare(
        self,
        logits: torch.Tensor,
        items: list[BatchItem],
        background: bool,
        after: FillJob | None = None,
    ) -> LightDraw | None:
        """`sample`, up to its launch: the rows' keys and parameters written for their current
        step, the grammar bitmask being filled (on the fill thread when `background`: the
        matchers must not advance until the draw is launched). after: the accept queued on that
        thread just before, which the caller waits for next; the caller then calls
        `LightDraw.hand_over`."""
        reqs = [item.req for item in items]
        rows_info = self._rows
        if rows_info is None or not rows_info.holds(reqs):
            rows_info = self._rows = _BatchRows(reqs)
        if rows_info.constrained and rows_info.grammar_problem():
            return None
        device = logits.device
        num_rows, vocab_size = logits.shape
        # Over a decode graph's logits, the inputs are laid out for all of its rows (the draw
        # replays a graph over them); the rows past the batch are drawn greedy and ignored.
        rows = self.graphs.rows_for(logits) if self.graphs is not None else None
        layout_rows = rows if rows is not None else num_rows
        # One host buffer, one copy: the keys and parameters (about 28 bytes a row, none when
        # every row is greedy), then the bitmask's words from a 64-byte boundary (the kernel is
        # compiled for an aligned pointer).
        layout = DrawLayout(
            layout_rows,
            0 if rows_info.all_greedy else -(-packed_bytes(layout_rows) // 64) * 64,
            bitmask_words(vocab_size) if rows_info.constrained else 0,
            rows_info.any_min_p,
        )
        draw = LightDraw(logits, layout, self.graphs if rows is not None else None)
        if layout.num_bytes:
            host, draw.send = host_buffer((layout.num_bytes,), torch.uint8, device)
        if rows_info.constrained:
            grammars = rows_info.grammars
            host_mask = mask_view(host, layout.param_bytes, layout_rows, layout.mask_words)
            host_mask = host_mask[:num_rows]
            if background:
                draw.fill = fill_bitmask_async(
                    grammars, vocab_size, host_mask, hand_over=after is None, after=after
                )
            else:
                fill_bitmask(grammars, vocab_size, out=host_mask)
        if rows_info.all_greedy:
            return draw  # no temperatures or keys to send
        keys, floats = packed(host, layout_rows)
        keys.numpy()[:num_rows] = rows_info.keys(self._rng)
        floats = floats.numpy()
        floats[:, :num_rows] = rows_info.floats
        floats[:, num_rows:] = ((1.0,), (0.0,), (1.0,))  # rows past the batch: greedy
        return draw


class _BatchRows:
    """What a batch's light draw needs of its rows' fixed parameters, worked out once and kept
    while the batch holds the same requests in the same order, as a decode step's mostly does
    (the host's per-row Python was most of a 64-row draw's ~170 us on the H200's host,
    benchmarks/gpu/draw_launch_bench.py). A request's sampling parameters and grammar do not
    change while it runs."""

    def __init__(self, reqs: list[Request]) -> None:
        self.reqs = reqs
        self.grammars = [req.grammar for req in reqs]
        self.constrained = any(g is not None for g in self.grammars)
        self._problem_free = False  # every grammar compiled well (checked until it holds)
        params = [req.sampling for req in reqs]
        greedy = [p.is_greedy for p in params]
        self.all_greedy = all(greedy)
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        min_ps = [p.min_p for p in params]
        self.any_min_p = not self.all_greedy and any(m > 0.0 for m in min_ps)
        self.floats = np.array((temps, min_ps, greedy), dtype=np.float32)  # [3, R]
        # Seeded rows (not greedy): their index, and their seed's first mix.
        self.seeded = [
            i for i, (p, g) in enumerate(zip(params, greedy)) if p.seed is not None and not g
        ]
        self.seeded_reqs = [reqs[i] for i in self.seeded]
        self.seed_mixes = np.array([_seed_mix(params[i].seed) for i in self.seeded], np.uint64)

    def holds(self, reqs: list[Request]) -> bool:
        """Whether `reqs` are this batch's requests, in its order."""
        return len(reqs) == len(self.reqs) and all(map(operator.is_, reqs, self.reqs))

    def grammar_problem(self) -> bool:
        """Whether some row's grammar failed to compile (waits for compiles still running)."""
        if self._problem_free:
            return False
        if any(g is not None and g.problem() is not None for g in self.grammars):
            return True
        self._problem_free = True
        return False

    def keys(self, rng: np.random.Generator) -> np.ndarray:
        """[R, 2] int64: each row's two 32-bit noise keys at its current step: a seeded row's
        from its seed and step, splitmix64(splitmix64(seed) ^ step) (`seed_keys`, as the
        SamplingBatch's `_seed_fields`), the others' random."""
        num = len(self.reqs)
        mixed = rng.integers(0, 2**64, size=num, dtype=np.uint64, endpoint=False)
        if self.seeded:
            steps = [len(r.output_ids) + r.num_inflight for r in self.seeded_reqs]
            mixed[self.seeded] = splitmix64_array(self.seed_mixes ^ np.array(steps, np.uint64))
        if sys.byteorder != "little":
            return split_keys(mixed)
        # Each key's low then high 32 bits (a little-endian host's word order), widened to int64.
        return mixed.view(np.uint32).reshape(num, 2).astype(np.int64)


class LightDraw:
    """A prepared light draw (`LightSampler.prepare`), launched once."""

    def __init__(self, logits: torch.Tensor, layout: DrawLayout, graphs: DrawGraphs | None) -> None:
        self.logits = logits  # [R, V] float32
        self.layout = layout  # its inputs' bytes (for layout.rows >= R rows)
        self.graphs = graphs  # set when the draw replays a graph (logits: a graph's output)
        # The host bytes' device copy: into a given tensor, else a new one.
        self.send: Callable[..., torch.Tensor] | None = None
        self.fill: FillJob | None = None  # the bitmask's fill, when it runs on the fill thread

    def hand_over(self) -> None:
        """Make sure the fill thread has started the bitmask's fill (`FillJob.hand_over`)."""
        if self.fill is not None:
            self.fill.hand_over()

    def launch(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Queue the draw on the device (waiting for a bitmask still being filled); returns the
        [R] int64 tokens (written into `out` when given)."""
        if self.fill is not None:
            self.fill.wait()
        layout = self.layout
        if self.graphs is not None:
            drawn = self.graphs.draw(self.logits, layout, self.send)
            return drawn if out is None else out.copy_(drawn)
        sent = self.send() if self.send is not None else None
        return draw_from_bytes(self.logits, sent, layout, out)


@functools.lru_cache(maxsize=1 << 16)
def _seed_mix(seed: int) -> int:
    """splitmix64 of a seed: the first half of a seeded row's key, the same at every step."""
    return splitmix64(seed & MASK64)
