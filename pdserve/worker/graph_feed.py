"""A decode step fed straight into its CUDA graph's static inputs (ModelRunner.forward's path for
every decode step a graph can run).

The general path (`ModelRunner.build_forward_batch`) packs a batch's index arrays into one host
buffer, copies it to the device and slices a view per array; a replay then copies five of those
views into the graph's static inputs and resets the rows past the batch. That is some thirty
torch calls a step, each several microseconds of host time (ten or more on a slow host), and a
decode step's host time is what a grammar's bitmask fill and a light draw must fit beside.

Here the host lays a decode step out exactly as its bucket's staging area on the device
(`cuda_graph_runner.BucketInputs`: the input block, padding rows included, then the step's page
table rows); one copy moves it all, a device copy moves the table rows into the graphs' page
table, an indexing call fills the input ids still being sampled on the device (`PendingTokens`),
and the graph replays. Every view those calls take is made once per shape and kept. While the
batch keeps its rows' pages (a page every page_size tokens a row), the graphs' page table already
holds them: only the input block is copied.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker.cuda_graph_runner import BucketInputs, CudaGraphRunner, padded_batch_size
from pdserve.worker.model_runner import PageTableCache, PendingTokens, new_input_ids, page_row

if TYPE_CHECKING:
    from pdserve.worker.lora.lora_layers import LoraBatch

_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}
_MAX_KEPT_VIEWS = 256  # (turn, bucket, page count) view sets kept; all dropped past it


class _Views(NamedTuple):
    """One (host buffer, bucket, page count)'s views, made once."""

    arrays: dict[str, np.ndarray]  # the block's arrays in the host buffer
    table: np.ndarray  # [bs, num_pages] int32 in the host buffer, after the block
    host: torch.Tensor  # [block + table bytes] uint8: the host bytes to copy ..
    staging: torch.Tensor  # .. into the bucket's staging area on the device
    host_block: torch.Tensor  # host[:block]: the bytes to copy when the table is unchanged
    table_src: torch.Tensor  # [bs, num_pages] int32: the table rows there ..
    table_dst: torch.Tensor  # .. and where the graphs read them: page_table[:bs, :num_pages]


class GraphFeed:
    """Feeds decode batches to `graphs` (a decode CudaGraphRunner with captured sizes).

    page_tables: the model runner's PageTableCache (shared with its general path). Two host
    buffers (pinned on CUDA) serve alternate steps: step N+1 is laid out while step N runs, and
    step N-1's copy out of the other buffer was done before its tokens were read back."""

    def __init__(
        self, graphs: CudaGraphRunner, page_size: int, page_tables: PageTableCache
    ) -> None:
        if graphs.tokens_per_row != 1 or not graphs.batch_sizes:
            raise ValueError("a GraphFeed feeds captured decode graphs (one token a row)")
        self.graphs = graphs
        self.inputs = graphs.inputs
        self.page_size = page_size
        self._page_tables = page_tables
        size = max(b.staging.numel() for b in self.inputs.buckets.values())
        pin = graphs.device.type == "cuda"
        self._host = [torch.zeros(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self._views: dict[tuple[int, int, int], _Views] = {}
        # What the graphs' page table holds since this feed last wrote it: (bucket, rows, page
        # count, the inputs' table_loads then) and the page rows (model_runner.page_row) written.
        self._table_key: tuple[int, int, int, int] | None = None
        self._table_rows: list[np.ndarray] = []
        self.num_fed = 0
        self.num_table_copies = 0

    def replay(
        self, batch: ScheduledBatch, pending: PendingTokens | None, lora: LoraBatch | None
    ) -> torch.Tensor | None:
        """Logits [B, V] float32 of a decode batch (every item one token) through its graph, or
        None, having done nothing, when no graph takes it (too many rows, a context past the
        captured one, adapters without LoRA graphs): the caller runs it the general way."""
        graphs = self.graphs
        items = batch.items
        bsz = len(items)
        bs = padded_batch_size(graphs.batch_sizes, bsz)
        if bs is None or (lora is not None and graphs.lora_inputs is None):
            return None
        pending_rows = pending.row_of if pending is not None else None
        ids, fill_dst, fill_src, starts, page_rows = decode_rows(items, pending_rows)
        counts = np.fromiter(map(len, page_rows), np.int64, bsz)  # [B]
        num_pages = int(counts.max())
        if int(starts.max()) + 1 > graphs.max_context_len or num_pages > graphs.max_pages:
            return None
        bucket = self.inputs.buckets[bs]
        views = self._views_for(bucket, num_pages)
        self._turn ^= 1
        pack_decode(
            views.arrays, views.table, ids, fill_dst, fill_src, starts, page_rows, counts,
            self.page_size, self._page_tables,
        )  # fmt: skip
        # page_row arrays are replaced, never changed in place: the same objects, the same pages.
        table_key = (bs, bsz, num_pages, self.inputs.table_loads)
        if table_key == self._table_key and all(map(operator.is_, page_rows, self._table_rows)):
            bucket.block.copy_(views.host_block, non_blocking=True)
        else:
            views.staging.copy_(views.host, non_blocking=True)
            views.table_dst.copy_(views.table_src)
            self._table_key, self._table_rows = table_key, page_rows
            self.num_table_copies += 1
        if pending is not None and pending.before_read is not None:
            pending.before_read()  # queues the sampling that writes pending.token_ids
        num_fills = len(fill_dst)
        if num_fills:
            head, dst, src = bucket.fill_views(num_fills)
            if fill_dst[-1] == num_fills - 1:  # (increasing) the rows 0, 1, ..: one call
                torch.index_select(pending.token_ids, 0, src, out=head)  # type: ignore[union-attr]
            else:
                bucket.input_ids.index_copy_(0, dst, pending.token_ids[src])  # type: ignore[union-attr]
        if lora is not None:
            graphs.lora_inputs.load(lora)  # type: ignore[union-attr]
        self.num_fed += 1
        return graphs.replay_loaded(bs, lora is not None, bsz)

    def _views_for(self, bucket: BucketInputs, num_pages: int) -> _Views:
        key = (self._turn, bucket.bs, num_pages)
        views = self._views.get(key)
        if views is not None:
            return views
        if len(self._views) >= _MAX_KEPT_VIEWS:
            self._views.clear()
        bs, block = bucket.bs, bucket.num_bytes
        end = block + bs * num_pages * 4
        host = self._host[self._turn][:end]
        base = host.numpy()
        arrays = {
            name: base[offset : offset + numel * dtype.itemsize].view(_NUMPY[dtype])
            for name, (offset, dtype, numel) in bucket.layout.items()
        }
        table_src = bucket.staging[block:end].view(torch.int32).view(bs, num_pages)
        views = _Views(
            arrays,
            base[block:end].view(np.int32).reshape(bs, num_pages),
            host,
            bucket.staging[:end],
            host[:block],
            table_src,
            self.inputs.page_table[:bs, :num_pages],
        )
        self._views[key] = views
        return views


def decode_rows(
    items: list[BatchItem], pending_rows: dict[int, int] | None
) -> tuple[list[int], list[int], list[int], np.ndarray, list[np.ndarray]]:
    """A decode batch's input ids with the rows still being sampled (`new_input_ids`: zeros
    there, their rows, their rows in the pending tokens), each item's position [B] int64, and
    its page row (`page_row`)."""
    ids, fill_dst, fill_src = new_input_ids(items, pending_rows)
    starts = np.fromiter((it.start for it in items), np.int64, len(items))
    return ids, fill_dst, fill_src, starts, [page_row(it.req) for it in items]


def pack_decode(
    arrays: dict[str, np.ndarray],  # the bucket's block arrays in the host buffer (block_layout)
    table: np.ndarray,  # [bs, num_pages] int32: its page table rows after them
    ids: list[int],  # [B]: decode_rows' outputs ..
    fill_dst: list[int],
    fill_src: list[int],
    starts: np.ndarray,
    page_rows: list[np.ndarray],
    counts: np.ndarray,  # [B] int64: each row's page count
    page_size: int,
    page_tables: PageTableCache,
) -> None:
    """Lay a decode batch of B <= bs rows out on the host: the bucket's block (rows past B
    padding: token 0, position 0, slot 0, seq_len 1; the fills listed) and its page table rows
    (rows past B zeros)."""
    bsz = len(ids)
    page_tables.fill(table[:bsz], page_rows, counts)
    arrays["input_ids"][:bsz] = ids
    arrays["positions"][:bsz] = starts
    arrays["slots"][:bsz] = (
        table[np.arange(bsz), starts // page_size] * page_size + starts % page_size
    )
    arrays["seq_lens"][:bsz] = starts + 1
    if bsz < table.shape[0]:  # padding rows (a host buffer serves other shapes between)
        table[bsz:] = 0
        for name in ("input_ids", "positions", "slots"):
            arrays[name][bsz:] = 0
        arrays["seq_lens"][bsz:] = 1
    num_fills = len(fill_dst)
    arrays["fill_dst"][:num_fills] = fill_dst
    arrays["fill_src"][:num_fills] = fill_src
