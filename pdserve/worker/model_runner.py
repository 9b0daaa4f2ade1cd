"""Owns the model and the KV pool on one device; turns a scheduled batch into logits.

Tensor parallelism (`tp`): every rank has a ModelRunner over its shards. Rank 0's announces each
step to the other ranks before running it (parallel/batch_broadcast.py) and the followers run the
same forward pass (parallel/follower.py): the collectives inside the model pair up.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker.draw_graphs import DrawGraphs
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models.qwen2_vl import MultimodalBatch
from pdserve.worker.parallel.batch_broadcast import (
    Command,
    Header,
    receive_multimodal,
    receive_tensor,
    send_header,
    send_multimodal,
)
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup

if TYPE_CHECKING:
    from pdserve.worker.lora.lora_layers import LoraBatch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CPU_POOL_BYTES_MAX = 2 << 30  # a CPU pool is capped: host memory is shared with everything else


class ForwardOutput(NamedTuple):
    """One step's results when hidden states are read out (pooling models, hidden states, prompt
    logprobs)."""

    logits: torch.Tensor | None  # [B, V] float32 at each last new token; None: pooling model
    hidden: torch.Tensor  # [T, hidden] model dtype, final-normed, every new token
    row_starts: list[int]  # [B]: each item's first row in `hidden`


class PendingTokens(NamedTuple):
    """Tokens sampled by the step still running on the device (the overlapped loop): the next
    step's input ids are filled from them there, without waiting for the host to read them."""

    token_ids: torch.Tensor  # [R] int64, device
    row_of: dict[int, int]  # id(request) -> its row in token_ids
    # Queues the sampling that writes token_ids when it was deferred: called once the batch is
    # built on the host, before any of the step's device work.
    before_read: Callable[[], None] | None = None


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, tp: TPGroup = SINGLE
    ) -> None:
        from pdserve.worker.models import load_model

        self.config = config  # resolved: no "auto" left
        self.model_config = model_config
        self.tp = tp
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and tp.is_parallel:  # the worker sees one GPU per rank
            index = tp.rank if tp.device_index is None else tp.device_index
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        self.dtype = _DTYPES[config.dtype]
        self.page_size = config.scheduler.page_size
        self.model = load_model(
            model_config, config.model_path, self.dtype, self.device, config.attention_backend, tp
        )
        # Page ids come from rank 0's allocator: every rank's pool holds as many pages.
        self.num_pages = tp.min_over_ranks(self._decide_num_pages(), self.device)
        self.kv_pool = KVPool(
            model_config, self.num_pages, self.page_size, self.dtype, self.device, tp
        )
        # Two [bytes] uint8 host buffers used in turn (see _host_buffer).
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staging_turn = 0
        self._page_tables = PageTableCache()
        self.lora = None  # LoraManager when LoRA is on
        if config.lora.enabled:
            from pdserve.worker.lora.lora_manager import LoraManager

            # Folds the adapter slots into the model's projections: before any graph capture.
            self.lora = LoraManager(config.lora, model_config, self.dtype, self.device, self.model)
        # The sampling draw over a decode graph's logits replays a graph of its own.
        self.draw_graphs = DrawGraphs(self.device) if self.device.type == "cuda" else None
        self.graph_runner = None
        # Graphs capture the decode step; an embedding model never decodes (and has no logits).
        # Not under tensor parallelism yet: a replay would skip the followers' announcement.
        capturable = not model_config.is_embedding and not tp.is_parallel
        capturable = capturable and model_config.vision is None  # M-RoPE rows: not captured yet
        if config.cuda_graph and self.device.type == "cuda" and capturable:
            from pdserve.worker.cuda_graph_runner import CudaGraphRunner

            self.graph_runner = CudaGraphRunner(self)
        # The other steps (prefill, mixed, decode above the graphs' batch) in pieces.
        self.piecewise = None
        if self.graph_runner is not None and self.graph_runner.batch_sizes:
            from pdserve.worker.piecewise_graphs import build_piecewise, supports_piecewise

            # No step holds more than max_batch_tokens: no bucket above it is captured.
            max_tokens = min(config.piecewise_graph_max_tokens, config.scheduler.max_batch_tokens)
            if max_tokens and supports_piecewise(self.model):
                self.piecewise = build_piecewise(self, max_tokens)
        # Decode steps a graph takes skip the general path's ForwardBatch (graph_feed.py).
        self.graph_feed = None
        if self.graph_runner is not None and self.graph_runner.batch_sizes:
            from pdserve.worker.graph_feed import GraphFeed

            self.graph_feed = GraphFeed(self.graph_runner, self.page_size, self._page_tables)

    def _decide_num_pages(self) -> int:
        sched = self.config.scheduler
        if sched.num_pages is not None:
            return sched.num_pages
        per_page = KVPool.bytes_per_page_for(self.model_config, self.page_size, self.dtype, self.tp)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * sched.mem_fraction)
        else:
            phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            budget = min(int(phys * 0.1 * sched.mem_fraction), _CPU_POOL_BYTES_MAX)
        num_pages = max(budget // per_page, 2)
        logger.info(
            "KV pool: %d pages of %d tokens (%.1f MiB)",
            num_pages,
            self.page_size,
            num_pages * per_page / 2**20,
        )
        return num_pages

    def _host_buffer(self, num_bytes: int) -> torch.Tensor:
        """[num_bytes] uint8 on the host, pinned on CUDA. Two buffers serve alternate steps: step
        N+1 is built while step N runs, and step N-1's copy out of the other buffer finished
        before its tokens were read back."""
        turn = self._staging_turn
        self._staging_turn ^= 1
        buf = self._staging[turn]
        if buf is None or buf.numel() < num_bytes:
            size = max(num_bytes, 2 * (buf.numel() if buf is not None else 0))
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._staging[turn] = buf
        return buf[:num_bytes]

    def build_forward_batch(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None = None,
        command: Command = Command.FORWARD,
    ) -> ForwardBatch:
        """Lay every index array of the batch out in one host buffer (pinned on CUDA) and copy it to
        the device in one transfer; the batch's device tensors are views of that one copy. Input
        tokens still being sampled (`pending`) are filled in on the device. Under tensor
        parallelism the same buffer goes to the other ranks with `command` (what they run)."""
        pending_rows = pending.row_of if pending is not None else None
        host = _HostBatch.build(
            batch, self.page_size, self._host_buffer, pending_rows, self._page_tables
        )
        device_buffer = host.buffer
        if self.device.type != "cpu":
            device_buffer = host.buffer.to(self.device, non_blocking=True)
        if self.tp.is_parallel:
            self._announce(command, host, batch.is_decode, device_buffer)
        if pending is not None and pending.before_read is not None:
            pending.before_read()
        return self._device_batch(host, device_buffer, batch.is_decode, pending)

    def _device_batch(
        self,
        host: _HostBatch,
        device_buffer: torch.Tensor,  # [num_bytes] uint8: host.buffer's copy on the device
        is_decode: bool,
        pending: PendingTokens | None,
    ) -> ForwardBatch:
        on_device = host.views(device_buffer)
        page_table_cpu = on_device["page_table"]
        if self.device.type != "cpu":
            page_table_cpu = host.views(host.buffer, ("page_table",))["page_table"]
        fill_dst, fill_src = on_device.pop("fill_dst"), on_device.pop("fill_src")
        if fill_dst.numel():
            if pending is None:
                raise RuntimeError("the batch takes pending tokens, but none were given")
            on_device["input_ids"].index_copy_(0, fill_dst, pending.token_ids[fill_src])
        return ForwardBatch(
            **on_device,
            seq_lens_cpu=host.seq_lens_cpu,
            extend_lens_cpu=host.extend_lens_cpu,
            is_decode=is_decode,
            max_extend_len=max(host.extend_lens_cpu),
            max_seq_len=max(host.seq_lens_cpu),
            page_table_cpu=page_table_cpu,
        )

    def _announce(
        self, command: Command, host: _HostBatch, is_decode: bool, device_buffer: torch.Tensor
    ) -> None:
        """Rank 0: send the followers the step's packed batch (tensor parallelism)."""
        num_tokens, batch_size, max_pages, num_fills = _layout_sizes(host.layout)
        if num_fills:  # the followers have no pending tokens to fill them from
            raise RuntimeError("tensor-parallel steps must not be overlapped (pending tokens)")
        header = Header(command, num_tokens, batch_size, max_pages, num_fills, is_decode)
        send_header(self.tp, header, self.device)
        self.tp.broadcast_from_first(device_buffer)

    def receive_forward_batch(self, header: Header) -> ForwardBatch:
        """A follower: the batch rank 0 announced with `header` (its packed buffer comes next)."""
        layout, num_bytes = _layout(
            header.num_tokens, header.batch_size, header.max_pages, header.num_fills
        )
        device_buffer = receive_tensor(self.tp, (num_bytes,), torch.uint8, self.device)
        host_buffer = device_buffer if self.device.type == "cpu" else device_buffer.cpu()
        host = _HostBatch(host_buffer, layout, [], [])
        arrays = host.views(host_buffer)
        host.seq_lens_cpu = arrays["seq_lens"].tolist()
        host.extend_lens_cpu = arrays["extend_lens"].tolist()
        fb = self._device_batch(host, device_buffer, header.is_decode, None)
        if self.model_config.vision is not None:  # what rank 0's vision tower made
            fb.mm = receive_multimodal(
                self.tp, self.device, self.dtype, self.model_config.hidden_size, MultimodalBatch
            )
        return fb

    def close(self) -> None:
        """Rank 0 of a tensor-parallel worker: tell the followers to exit."""
        if self.tp.is_parallel and self.tp.rank == 0:
            send_header(self.tp, Header(Command.STOP), self.device)

    def _forward_batch(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None = None,
        command: Command = Command.FORWARD,
    ) -> ForwardBatch:
        """build_forward_batch, with the batch's LoRA rows when any request uses an adapter."""
        fb = self.build_forward_batch(batch, pending, command)
        fb.lora = self._lora_batch(batch)
        if self.model_config.vision is not None:  # images and M-RoPE positions
            fb.mm = self.model.multimodal_batch(batch.items, self.device)
            if self.tp.is_parallel:  # the followers take the tower's output, not the pixels
                send_multimodal(self.tp, fb.mm, self.device)
        return fb

    def _lora_batch(self, batch: ScheduledBatch) -> LoraBatch | None:
        """The batch's rows grouped by adapter; None without LoRA or when all rows are base."""
        if self.lora is None or all(it.req.lora_name is None for it in batch.items):
            return None
        row_names = [it.req.lora_name for it in batch.items for _ in range(it.num_tokens)]
        return self.lora.prepare(row_names)

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, pending: PendingTokens | None = None) -> torch.Tensor:
        """Logits [B, vocab] float32 on the device, one row per batch item."""
        if self.graph_feed is not None and batch.is_decode:
            logits = self.graph_feed.replay(batch, pending, self._lora_batch(batch))
            if logits is not None:
                return logits
        fb = self._forward_batch(batch, pending)
        # A step with adapters replays a graph captured with the LoRA kernels (cuda_graph_runner).
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.replay(fb)
        if self.piecewise is not None and self.piecewise.can_run(fb):
            return self.piecewise.run(fb)
        return self.model(fb, self.kv_pool)

    @torch.inference_mode()
    def forward_rows(self, batch: ScheduledBatch) -> ForwardOutput:
        """Like forward, reading out every new token's final hidden state too (no CUDA graph):
        only steps holding a request that asked for rows pay for it."""
        fb = self._forward_batch(batch, command=Command.FORWARD_ROWS)
        hidden = self.model.forward_hidden(fb, self.kv_pool, all_rows=True)  # [T, hidden]
        logits = None
        if not self.model_config.is_embedding:
            logits = self.model.compute_logits(hidden[fb.logit_idx])  # [B, V] float32
        starts = np.cumsum([0] + [it.num_tokens for it in batch.items[:-1]]).tolist()
        return ForwardOutput(logits, hidden, starts)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, V] float32 through the lm_head (generation models)."""
        with torch.inference_mode():
            if self.tp.is_parallel:  # the vocab-parallel head needs every rank
                hidden = hidden.contiguous()
                header = Header(Command.LOGITS, num_tokens=hidden.shape[0])
                send_header(self.tp, header, self.device)
                self.tp.broadcast_from_first(hidden)
            return self.model.compute_logits(hidden)

    def compute_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, num_labels] float32 through the score head (classifiers)."""
        with torch.inference_mode():
            return self.model.compute_scores(hidden)


def _new_token_ids(req: Request, start: int, end: int) -> list[int]:
    """req.all_ids[start:end] without concatenating the whole prompt and output."""
    num_prompt = len(req.prompt_ids)
    if start >= num_prompt:
        return req.output_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return req.prompt_ids[start:end]
    return req.prompt_ids[start:] + req.output_ids[: end - num_prompt]


def page_row(req: Request) -> np.ndarray:
    """req.page_ids as an int32 array, copied once per list: the scheduler replaces the list on
    every change (Request.page_ids), so a decode step reuses the rows of all requests that did
    not get a page since the last one instead of converting every page id of the batch again."""
    pages = req.page_ids
    row = req.page_row
    if row is None or req.page_row_of is not pages or row.size != len(pages):
        row = np.array(pages, dtype=np.int32)
        req.page_row, req.page_row_of = row, pages
    return row


class PageTableCache:
    """The last step's page table and the page rows it was made of: a decode step, whose rows
    are mostly the same requests in the same order with the same pages, rewrites only the rows
    whose page_row changed (a new page every page_size tokens) and copies the rest."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.table = np.zeros((0, 0), dtype=np.int32)

    def fill(self, out: np.ndarray, rows: list[np.ndarray], counts: np.ndarray) -> None:
        """out [B, P] int32 := row r holds rows[r] (counts[r] pages), zeros after it."""
        table = self.table
        changed = None
        if table.shape == out.shape:
            changed = [r for r, (new, old) in enumerate(zip(rows, self.rows)) if new is not old]
        if changed is None or 2 * len(changed) > len(rows):
            table = np.zeros(out.shape, dtype=np.int32)
            # The mask's cells in row-major order are the rows' pages one after the other.
            table[np.arange(out.shape[1]) < counts[:, None]] = np.concatenate(rows)
        else:
            for r in changed:
                row = rows[r]
                table[r, : row.size] = row
                table[r, row.size :] = 0
        self.rows, self.table = rows, table
        out[:] = table


def new_input_ids(
    items: list[BatchItem], pending_rows: dict[int, int] | None
) -> tuple[list[int], list[int], list[int]]:
    """The batch's new token ids, and for each token still being sampled on the device (a zero
    placeholder here) its row in input_ids and its row in the pending tokens."""
    ids: list[int] = []
    fill_dst: list[int] = []
    fill_src: list[int] = []
    pending = pending_rows if pending_rows is not None else {}
    for it in items:  # (a decode step's hot loop: one pass, no call for a pending token alone)
        req = it.req
        start = it.start
        end = start + it.num_tokens
        known = len(req.prompt_ids) + len(req.output_ids)
        if end <= known:
            ids += _new_token_ids(req, start, end)
            continue
        src = pending.get(id(req))
        if src is None or end - known != 1:
            raise RuntimeError(
                f"request {req.rid}: tokens {known}..{end - 1} are not known and not pending"
            )
        if start < known:
            ids += _new_token_ids(req, start, known)
        fill_dst.append(len(ids))
        fill_src.append(src)
        ids.append(0)
    return ids, fill_dst, fill_src


# Every array starts on a 16-byte boundary: Triton specialises its pointer arguments on that, so
# unaligned views would compile extra kernel variants (and lose vector loads).
_ALIGN_BYTES = 16


Layout = dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]


def _layout_sizes(layout: Layout) -> tuple[int, ...]:
    """(num_tokens, bsz, max_pages, num_fills): the arguments _layout built `layout` from."""
    bsz, max_pages = layout["page_table"][3]
    return layout["input_ids"][3][0], bsz, max_pages, layout["fill_dst"][3][0]


@functools.lru_cache(maxsize=1024)
def _layout(num_tokens: int, bsz: int, max_pages: int, num_fills: int) -> tuple[Layout, int]:
    """name -> (byte offset, bytes, dtype, shape) of each array of the packed batch, and the total
    bytes (cached: decode steps repeat their sizes; do not modify)."""
    fields: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("input_ids", torch.int64, (num_tokens,)),
        ("positions", torch.int64, (num_tokens,)),
        ("slots", torch.int64, (num_tokens,)),
        ("logit_idx", torch.int64, (bsz,)),
        ("seq_lens", torch.int32, (bsz,)),
        ("extend_lens", torch.int32, (bsz,)),
        ("extend_starts", torch.int32, (bsz,)),
        ("page_table", torch.int32, (bsz, max_pages)),
        # Input tokens to take from the step still running (PendingTokens): rows of input_ids,
        # and the rows of the pending token ids they come from.
        ("fill_dst", torch.int64, (num_fills,)),
        ("fill_src", torch.int64, (num_fills,)),
    ]
    layout: Layout = {}
    offset = 0
    for name, dtype, shape in fields:
        num_bytes = math.prod(shape) * dtype.itemsize
        layout[name] = (offset, num_bytes, dtype, shape)
        offset += -(-num_bytes // _ALIGN_BYTES) * _ALIGN_BYTES
    return layout, offset


@dataclass
class _HostBatch:
    """A batch's index arrays packed into one byte buffer (see _layout), filled on the host."""

    buffer: torch.Tensor  # [num_bytes] uint8, cpu (pinned for a CUDA device)
    layout: Layout
    seq_lens_cpu: list[int]  # [B]
    extend_lens_cpu: list[int]  # [B]

    @classmethod
    def build(
        cls,
        batch: ScheduledBatch,
        page_size: int,
        host_buffer: Callable[[int], torch.Tensor],
        pending_rows: dict[int, int] | None,
        page_tables: PageTableCache,
    ) -> _HostBatch:
        items = batch.items
        input_ids, fill_dst, fill_src = new_input_ids(items, pending_rows)
        bsz = len(items)
        starts = np.fromiter((it.start for it in items), np.int64, bsz)  # [B]
        ext_lens = np.fromiter((it.num_tokens for it in items), np.int64, bsz)  # [B]
        seq_lens = starts + ext_lens
        ends = np.cumsum(ext_lens)  # [B]: one past each sequence's last token in T
        num_tokens = int(ends[-1])
        page_rows = [page_row(it.req) for it in items]
        counts = np.fromiter(map(len, page_rows), np.int64, bsz)  # [B]
        max_pages = int(counts.max())
        layout, num_bytes = _layout(num_tokens, bsz, max_pages, len(fill_dst))
        host = cls(
            host_buffer(num_bytes),
            layout,
            seq_lens.tolist(),
            ext_lens.tolist(),
        )
        base = host.buffer.numpy()
        arrays = {
            name: base[offset : offset + num_bytes].view(_NUMPY_DTYPES[dtype]).reshape(shape)
            for name, (offset, num_bytes, dtype, shape) in layout.items()
        }
        table = arrays["page_table"]  # [B, P]
        page_tables.fill(table, page_rows, counts)
        arrays["input_ids"][:] = input_ids
        arrays["fill_dst"][:] = fill_dst
        arrays["fill_src"][:] = fill_src
        row_of = np.repeat(np.arange(bsz), ext_lens)  # [T]: the sequence of each token
        positions = np.arange(num_tokens) - (ends - ext_lens)[row_of] + starts[row_of]
        arrays["positions"][:] = positions
        arrays["slots"][:] = (
            table[row_of, positions // page_size] * page_size + positions % page_size
        )
        arrays["logit_idx"][:] = ends - 1
        arrays["seq_lens"][:] = seq_lens
        arrays["extend_lens"][:] = ext_lens
        arrays["extend_starts"][:] = ends - ext_lens
        return host

    def views(
        self, buf: torch.Tensor, names: tuple[str, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """The named arrays inside `buf` (all, or `names`): this buffer, or its device copy.
        (Sliced from one view of the buffer per dtype: each view op costs the host a few
        microseconds, and a decode step takes ten arrays.)"""
        whole: dict[torch.dtype, torch.Tensor] = {}
        out = {}
        for name in names or self.layout:
            offset, num_bytes, dtype, shape = self.layout[name]
            typed = whole.get(dtype)
            if typed is None:
                typed = whole[dtype] = buf.view(dtype)
            size = dtype.itemsize  # every offset is 16-byte aligned (_layout)
            flat = typed[offset // size : (offset + num_bytes) // size]
            out[name] = flat if len(shape) == 1 else flat.view(shape)
        return out


_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}
