"""The race draw (worker/race_sampling.py) replayed from CUDA graphs over the decode graphs' logits.

Queuing the draw's Triton kernel cost the H200's host ~95 us a step (its launcher binds and
specializes ~20 arguments), a graph replay of it ~4 us (benchmarks/gpu/draw_launch_bench.py,
batch 64, 128k vocabulary); on a slow host a constrained batch-64 step is bound by the host, not
the device. A decode step replayed from a graph (cuda_graph_runner.py) leaves its logits in that
graph's static output buffer [bs, V], bs the batch's padded size; the draw over them is captured
once per buffer and kind of draw (greedy or not, bitmask or not, min-p or not) over all bs rows,
reading its inputs (the rows' keys and parameters, the bitmask: the bytes LightSampler lays out
for bs rows) from a static device buffer that each draw first copies its host bytes into. The
rows past the batch are drawn too (the host marks them greedy) and their tokens ignored.

A draw over any other logits (an eager step's, a subset of a graph's rows) runs the kernel as
before. Graphs are captured on a side stream without synchronizing the device, the first time
their key comes (a fresh key's draw runs eagerly on the static buffers, then is captured for the
next time). Off the GPU the same bookkeeping replays a recorded call instead of a graph, which is
what the CPU tests exercise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.worker.race_sampling import race_draw


@dataclass(frozen=True)
class DrawLayout:
    """How a draw's inputs lie in its bytes (LightSampler's buffer): `param_bytes` of keys and
    parameters for `rows` rows (0: every row greedy), then the bitmask's rows of `mask_words`
    int32 words (0: no bitmask)."""

    rows: int
    param_bytes: int
    mask_words: int
    any_min_p: bool

    @property
    def num_bytes(self) -> int:
        return self.param_bytes + self.rows * self.mask_words * 4


class _Recorded:
    """Off the GPU: a 'graph' that calls what was recorded again (CPU tests)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.replay = fn


class DrawGraphs:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[int, tuple[int, int, int]] = {}  # data_ptr -> (rows, V, row stride)
        self._graphs: dict[tuple[int, DrawLayout], tuple[object, torch.Tensor]] = {}
        self._inputs: dict[DrawLayout, torch.Tensor] = {}  # static device bytes per layout
        self._pool: object | None = None
        self._stream: torch.cuda.Stream | None = None
        self.num_captured = 0
        self.num_replays = 0

    def add_logits_buffer(self, logits: torch.Tensor) -> None:
        """Register a decode graph's static output [bs, V] float32: draws over its first rows
        may replay."""
        if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
            raise ValueError(f"not a [bs, V] float32 logits buffer: {tuple(logits.shape)}")
        self._buffers[logits.data_ptr()] = (logits.shape[0], logits.shape[1], logits.stride(0))

    def rows_for(self, logits: torch.Tensor) -> int | None:
        """The rows of the registered buffer whose first rows `logits` are, or None (no graph)."""
        found = self._buffers.get(logits.data_ptr())
        if found is None or logits.dim() != 2:
            return None
        rows, vocab, stride = found
        fits = logits.shape[0] <= rows and logits.shape[1] == vocab
        return rows if fits and logits.stride() == (stride, 1) else None

    def draw(
        self,
        logits: torch.Tensor,
        layout: DrawLayout,
        send: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        """[B] int64 tokens for the B rows of `logits` (`rows_for(logits) == layout.rows`).
        send(dst): copies the host bytes laid out as `layout` into dst (queued); None when there
        are none (every row greedy, no bitmask). The result lies in the graph's static output,
        valid until its next draw (the stream orders any reader queued before then)."""
        batch = logits.shape[0]
        inputs = None
        if layout.num_bytes:
            inputs = self._inputs.get(layout)
            if inputs is None:
                inputs = self._inputs[layout] = torch.empty(
                    layout.num_bytes, dtype=torch.uint8, device=self.device
                )
            send(inputs)
        key = (logits.data_ptr(), layout)
        captured = self._graphs.get(key)
        if captured is not None:
            graph, out = captured
            graph.replay()
            self.num_replays += 1
            return out[:batch]
        out = torch.empty(layout.rows, dtype=torch.int64, device=self.device)
        full = torch.as_strided(logits, (layout.rows, logits.shape[1]), logits.stride())

        def run() -> None:
            draw_from_bytes(full, inputs, layout, out)

        run()  # this draw's tokens (and the kernel compiled before any capture)
        self._graphs[key] = (self._capture(run), out)
        self.num_captured += 1
        return out[:batch]

    def _capture(self, run: Callable[[], None]) -> object:
        if self.device.type != "cuda":
            return _Recorded(run)
        if self._stream is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        # Not torch.cuda.graph(): it synchronizes the device and empties the allocators' caches,
        # a stall in the middle of serving. Only this thread's calls are captured.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                run()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return graph


def draw_from_bytes(
    logits: torch.Tensor,
    inputs: torch.Tensor | None,
    layout: DrawLayout,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The race draw over the `layout.rows` rows of `logits`, its inputs read from `inputs`
    (device bytes laid out as `layout`; None when it has none); [rows] int64 tokens, written
    into `out` when given."""
    bitmask = None
    if layout.mask_words:
        bitmask = mask_view(inputs, layout.param_bytes, layout.rows, layout.mask_words)
    if not layout.param_bytes:  # every row greedy
        return race_draw(logits, None, None, None, None, bitmask, all_greedy=True, out=out)
    keys, params = packed(inputs, layout.rows)
    return race_draw(
        logits, params[0], params[1], params[2], keys, bitmask,
        any_min_p=layout.any_min_p, out=out,
    )  # fmt: skip


# ---- the bytes' layout (LightSampler writes them on the host) ---------------------------


def mask_view(buf: torch.Tensor, start: int, num_rows: int, words: int) -> torch.Tensor:
    """The bitmask [R, W] int32 lying at byte `start` of a uint8 buffer."""
    return buf[start : start + num_rows * words * 4].view(torch.int32).view(num_rows, words)


def _padded_rows(num_rows: int) -> int:
    """Rows of each float array in the packed buffer: a multiple of 4, so that every array starts
    16 bytes aligned whatever the batch (the race kernel is specialized on its pointers'
    alignment: an unaligned one was a new compile the first time a batch size of its class came)."""
    return -(-num_rows // 4) * 4


def packed_bytes(num_rows: int) -> int:
    return num_rows * 16 + 3 * _padded_rows(num_rows) * 4


def packed(buf: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' keys [R, 2] int64 and their temperature, min-p, greedy [3, R] float32 (each row
    of the latter contiguous and 16-byte aligned): the first `packed_bytes(R)` bytes of a uint8
    buffer (host or device), so that one copy moves both."""
    split = num_rows * 16
    keys = buf[:split].view(torch.int64).view(num_rows, 2)
    padded = _padded_rows(num_rows)
    floats = buf[split : split + 12 * padded].view(torch.float32).view(3, padded)
    return keys, floats[:, :num_rows]
