"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at startup, replayed with
the batch padded to the next bucket. A decode step of a small model is mostly kernel-launch latency;
a replay launches the whole forward pass at once.

The graphs read static input buffers (token ids, positions, KV slots, page table, sequence lengths)
sized for the largest bucket and the longest context; a replay copies the batch into their first
rows. Padded rows decode token 0 at position 0 into slot 0, which is page 0: the allocator never
hands that page out, so their KV writes land nowhere that matters. Their seq_len is 1 and their page
table row is zeros, so their attention reads only page 0. The decode kernel's host-side launch
parameters (its split count) are fixed from the longest context at capture, so a replay is valid for
any seq_len up to max_context_len.

With LoRA on, each bucket gets a second graph captured with the LoRA kernels in it; it reads the
batch's adapter tiles from a static buffer (`LoraGraphInputs`: at most max_loras_per_batch
adapters, the tiles past the batch's empty), so a decode step with adapters replays too. A step
without adapters replays the first graph and pays nothing for LoRA.

Speculative decoding's chain verify pass (worker/speculative/spec_step.py) replays a second
runner of its own, `tokens_per_row` = 1 + k: every row is a causal extend of exactly 1 + k tokens
(a row with fewer is padded after its real tokens: verify_batch.build_padded_chain_batch), so the
extend kernel's grid (max_extend_len = 1 + k) is fixed at capture. Padding tokens, in a real row
or a padded one, feed token 0 at position 0 into slot 0 (page 0); a padded row's seq_len is 1 + k
(an extend over no prefix, reading page 0 only). A real row's tokens see only the keys before
them (causal), so the padding after them changes nothing they compute. Its graphs return every
token's hidden state; the caller reads the real rows and computes their logits outside the graph.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from pdserve.worker.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from pdserve.worker.lora.lora_layers import LoraGraphInputs
    from pdserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
_BUCKET_STEP_ABOVE_256 = 64
_NUM_WARMUP_RUNS = 2  # the first run compiles the Triton kernels, which must not happen in capture


def capture_batch_sizes(max_batch: int) -> list[int]:
    """The buckets up to max_batch, ascending, always ending with max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"cuda_graph_max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in BATCH_SIZE_BUCKETS if s < max_batch]
    top = BATCH_SIZE_BUCKETS[-1]
    sizes += range(top + _BUCKET_STEP_ABOVE_256, max_batch, _BUCKET_STEP_ABOVE_256)
    return sizes + [max_batch]


def padded_batch_size(sizes: list[int], batch_size: int) -> int | None:
    """The smallest captured size >= batch_size (sizes ascending), or None when none is."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


def num_table_pages(max_context_len: int, page_size: int) -> int:
    """Width of the static page table: enough pages for the longest context."""
    return -(-max_context_len // page_size)


# Each bucket's input block: (name, dtype, elements per row); every array 16-byte aligned.
# input_ids .. seq_lens are what its graph reads. fill_dst / fill_src have room for one entry
# a token: a step fed from the host (graph_feed.py) lists there the input ids still being
# sampled on the device (their rows in input_ids, their rows in the pending tokens).
_BLOCK_FIELDS = (
    ("input_ids", torch.int64, "token"),
    ("positions", torch.int64, "token"),
    ("slots", torch.int64, "token"),
    ("seq_lens", torch.int32, "row"),
    ("fill_dst", torch.int64, "token"),
    ("fill_src", torch.int64, "token"),
)
_ALIGN_BYTES = 16  # Triton specialises pointer arguments on 16-byte alignment


def block_layout(
    bs: int, tokens_per_row: int
) -> tuple[dict[str, tuple[int, torch.dtype, int]], int]:
    """name -> (byte offset, dtype, elements) of a bucket's input block, and its total bytes."""
    layout = {}
    offset = 0
    for name, dtype, per in _BLOCK_FIELDS:
        numel = bs * tokens_per_row if per == "token" else bs
        layout[name] = (offset, dtype, numel)
        offset += -(-numel * dtype.itemsize // _ALIGN_BYTES) * _ALIGN_BYTES
    return layout, offset


class BucketInputs:
    """One captured batch size's static inputs: a single device block (`block_layout`), so a
    step fed from the host copies its bytes in whole with one transfer. Rows past the batch hold
    the padding values (module docstring): token 0 at position 0 writing slot 0, seq_len
    tokens_per_row. table_pages: room after the block for a [bs, table_pages] int32 page table
    (`staging`), which that same transfer carries and a device copy moves into the graphs' page
    table (decode graphs: graph_feed.py)."""

    def __init__(
        self, bs: int, tokens_per_row: int, device: torch.device | str, table_pages: int = 0
    ) -> None:
        self.bs = bs
        self.layout, self.num_bytes = block_layout(bs, tokens_per_row)
        self.staging = torch.zeros(
            self.num_bytes + bs * table_pages * 4, dtype=torch.uint8, device=device
        )
        self.block = self.staging[: self.num_bytes]
        views = {
            name: self.block[offset : offset + numel * dtype.itemsize].view(dtype)
            for name, (offset, dtype, numel) in self.layout.items()
        }
        self.input_ids = views["input_ids"]  # [bs * n] int64
        self.positions = views["positions"]  # [bs * n] int64
        self.slots = views["slots"]  # [bs * n] int64
        self.seq_lens = views["seq_lens"]  # [bs] int32
        self.fill_dst = views["fill_dst"]  # [bs * n] int64: rows of input_ids ..
        self.fill_src = views["fill_src"]  # [bs * n] int64: .. and of the pending tokens
        self.seq_lens.fill_(tokens_per_row)
        self._fill_views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fill_views(self, num_fills: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids[:k], fill_dst[:k], fill_src[:k]) for k = num_fills, made once (a view op
        costs the host microseconds a step)."""
        views = self._fill_views.get(num_fills)
        if views is None:
            views = self._fill_views[num_fills] = (
                self.input_ids[:num_fills],
                self.fill_dst[:num_fills],
                self.fill_src[:num_fills],
            )
        return views


class GraphInputs:
    """The graphs' static inputs: one `BucketInputs` block per captured batch size, and one page
    table sized for the largest bucket and the longest context, shared by every graph (only one
    runs at a time).

    Every row feeds `tokens_per_row` tokens: 1 for a decode step; 1 + k for a chain verify pass
    (row b's tokens are rows b * tokens_per_row.. of the token arrays). A bucket's rows past the
    batch hold padding values, and their page table rows zeros up to the batch's page count;
    page table columns past it may keep stale page ids (no row reads past its own seq_len).
    """

    def __init__(
        self,
        batch_sizes: list[int],
        max_pages: int,
        max_context_len: int,
        device: torch.device | str,
        tokens_per_row: int = 1,
    ) -> None:
        kw = {"device": device}
        n = tokens_per_row
        max_batch = max(batch_sizes)
        self.max_context_len = max_context_len
        self.tokens_per_row = n
        # Decode graphs are fed from the host with their page tables (graph_feed.py).
        table_pages = max_pages if n == 1 else 0
        self.buckets = {bs: BucketInputs(bs, n, device, table_pages) for bs in batch_sizes}
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, **kw)
        rows = torch.arange(max_batch, dtype=torch.int64, **kw)  # [max_batch]
        self.logit_idx = rows * n + n - 1  # [max_batch]: each row's last token
        self.extend_lens = torch.full((max_batch,), n, dtype=torch.int32, **kw)  # [max_batch]
        self.extend_starts = (rows * n).to(torch.int32)  # [max_batch]
        self.table_loads = 0  # `load`s so far: each writes the page table (graph_feed.py)

    def batch(self, bs: int) -> ForwardBatch:
        """What the graph of size bs is captured on: its bucket's block and the shared table."""
        n = self.tokens_per_row
        bucket = self.buckets[bs]
        return ForwardBatch(
            input_ids=bucket.input_ids,
            positions=bucket.positions,
            slots=bucket.slots,
            page_table=self.page_table[:bs],
            seq_lens=bucket.seq_lens,
            # Host lists a capturable backend never reads (only the torch reference does).
            seq_lens_cpu=[n] * bs,
            extend_lens_cpu=[n] * bs,
            logit_idx=self.logit_idx[:bs],
            is_decode=n == 1,
            extend_lens=self.extend_lens[:bs],
            extend_starts=self.extend_starts[:bs],
            max_extend_len=n,  # fixes the extend kernel's grid
            max_seq_len=self.max_context_len,  # fixes the decode kernel's split count
        )

    def load(self, fb: ForwardBatch, bs: int) -> None:
        """Copy a batch of tokens_per_row tokens a row into the first rows of bucket bs (fb's
        tensors may be on the host: one copy each); the bucket's rows after it become padding."""
        bsz, num_pages, n = fb.batch_size, fb.page_table.shape[1], self.tokens_per_row
        if fb.num_tokens != bsz * n:
            raise ValueError(
                f"a batch of {bsz} rows and {fb.num_tokens} tokens: the graphs take exactly "
                f"{n} tokens a row"
            )
        if bsz > bs:
            raise ValueError(f"a batch of {bsz} rows does not fit the graph of {bs}")
        bucket = self.buckets[bs]
        self.table_loads += 1
        bucket.input_ids[: bsz * n].copy_(fb.input_ids)
        bucket.positions[: bsz * n].copy_(fb.positions)
        bucket.slots[: bsz * n].copy_(fb.slots)
        bucket.seq_lens[:bsz].copy_(fb.seq_lens)
        self.page_table[:bsz, :num_pages].copy_(fb.page_table)
        if bsz < bs:  # rows an earlier, larger batch of this bucket may have written
            bucket.input_ids[bsz * n :].zero_()
            bucket.positions[bsz * n :].zero_()
            bucket.slots[bsz * n :].zero_()
            bucket.seq_lens[bsz:].fill_(n)
            self.page_table[bsz:bs, :num_pages].zero_()


class CudaGraphRunner:
    """Captures `model_runner.model` on batches of `tokens_per_row` tokens a row.

    tokens_per_row 1: decode steps; `replay` returns logits [B, V] float32 (with LoRA graphs too).
    tokens_per_row n > 1: chain verify passes of speculative decoding (worker/speculative/), each
    row a causal extend of n tokens over its paged KV; `replay` returns the final-normed hidden
    states of every token, [B * n, hidden], from which the caller computes the logits it reads.
    Steps with LoRA adapters do not replay these (no LoRA graphs are captured for them).

    Does nothing (can_run is always False) when the attention backend cannot be captured.
    """

    def __init__(self, model_runner: ModelRunner, tokens_per_row: int = 1) -> None:
        if tokens_per_row < 1:
            raise ValueError(f"tokens_per_row must be >= 1, got {tokens_per_row}")
        config = model_runner.config
        self.model = model_runner.model
        self.kv_pool = model_runner.kv_pool
        self.device = model_runner.device
        self.draw_graphs = model_runner.draw_graphs  # decode graphs register their logits there
        self.tokens_per_row = tokens_per_row
        self.max_context_len = model_runner.model_config.context_limit(
            config.scheduler.max_context_len
        )
        # A verify row's padding tokens sit after its real ones: up to n - 1 past the context.
        max_seq_len = self.max_context_len + tokens_per_row - 1
        self.max_pages = num_table_pages(max_seq_len, model_runner.page_size)
        max_batch = min(config.cuda_graph_max_batch, config.scheduler.max_running_requests)
        self.batch_sizes: list[int] = []  # captured, ascending
        # (bs, with LoRA) -> graph, and its output in the graph pool: logits [bs, V] float32
        # (decode) or hidden states [bs * n, hidden] (verify)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.lora_inputs: LoraGraphInputs | None = None
        self.num_replays = 0
        self._output_rows: dict[tuple[tuple[int, bool], int], torch.Tensor] = {}
        attention = self.model.attention
        if not attention.supports_cuda_graph:
            logger.info("CUDA graphs off: attention backend %r cannot be captured", attention.name)
            return
        sizes = capture_batch_sizes(max_batch)
        self.inputs = GraphInputs(
            sizes, self.max_pages, self.max_context_len, self.device, tokens_per_row
        )
        if model_runner.lora is not None and tokens_per_row == 1:
            from pdserve.worker.lora.lora_layers import LoraGraphInputs

            self.lora_inputs = LoraGraphInputs(model_runner.lora.weights, sizes[-1], self.device)
        self._capture(sizes)

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()  # shared: only one graph runs at a time
        # Largest first: its intermediates size the pool, the smaller graphs reuse that memory.
        for bs in reversed(sizes):
            for with_lora in (False, True) if self.lora_inputs is not None else (False,):
                batch = self.inputs.batch(bs)
                if with_lora:
                    batch.lora = self.lora_inputs.batch(bs)
                self._capture_one(batch, (bs, with_lora), pool)
        torch.cuda.synchronize(self.device)
        self.batch_sizes = sorted(sizes)
        logger.info(
            "captured %d CUDA graphs (%s batch sizes %s%s, contexts up to %d) in %.1f s",
            len(self.graphs),
            "decode"
            if self.tokens_per_row == 1
            else f"verify ({self.tokens_per_row} tokens a row)",
            self.batch_sizes,
            ", with and without LoRA" if self.lora_inputs is not None else "",
            self.max_context_len,
            time.perf_counter() - start,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """What a graph runs: logits [B, V] (decode) or every token's hidden state [T, hidden]."""
        if self.tokens_per_row == 1:
            return self.model(batch, self.kv_pool)
        return self.model.forward_hidden(batch, self.kv_pool, all_rows=True)

    def _capture_one(self, batch: ForwardBatch, key: tuple[int, bool], pool: object) -> None:
        for _ in range(_NUM_WARMUP_RUNS):
            self._forward(batch)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[key] = self._forward(batch)
        self.graphs[key] = graph
        if self.tokens_per_row == 1 and self.draw_graphs is not None:
            self.draw_graphs.add_logits_buffer(self.outputs[key])  # the draw replays too

    def can_run(self, fb: ForwardBatch) -> bool:
        n = self.tokens_per_row
        return (
            bool(self.batch_sizes)
            and fb.is_decode == (n == 1)
            and fb.tree_mask is None
            and fb.batch_size <= self.batch_sizes[-1]
            and fb.num_tokens == fb.batch_size * n
            and (fb.max_seq_len or 0) <= self.max_context_len + n - 1
            and fb.page_table.shape[1] <= self.max_pages
            and (fb.lora is None or self.lora_inputs is not None)
        )

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [B, V] float32 of a decode batch, or hidden states [B * n, hidden] of a verify
        batch (can_run(fb) must hold). A decode step the model runner builds itself is fed to
        its graph without a ForwardBatch (graph_feed.py).

        The result lives in the graphs' memory pool: it is valid until the next replay.
        """
        bsz = fb.batch_size
        bs = padded_batch_size(self.batch_sizes, bsz)
        if bs is None or fb.is_decode != (self.tokens_per_row == 1):
            raise ValueError(
                f"no CUDA graph for a batch of {bsz} (decode={fb.is_decode}): captured "
                f"sizes {self.batch_sizes} of {self.tokens_per_row} tokens a row"
            )
        self.inputs.load(fb, bs)
        if fb.lora is not None:
            if self.lora_inputs is None:
                raise ValueError(
                    "a batch with LoRA adapters, but no graphs were captured with LoRA"
                )
            self.lora_inputs.load(fb.lora)
        return self.replay_loaded(bs, fb.lora is not None, bsz)

    def replay_loaded(self, bs: int, with_lora: bool, bsz: int) -> torch.Tensor:
        """Replay the graph of bucket bs (its inputs loaded) and return its first bsz rows."""
        key = (bs, with_lora)
        self.graphs[key].replay()
        self.num_replays += 1
        rows = self._output_rows.get((key, bsz))
        if rows is None:  # a view op costs the host microseconds a step: made once
            rows = self.outputs[key][: bsz * self.tokens_per_row]
            self._output_rows[(key, bsz)] = rows
        return rows
