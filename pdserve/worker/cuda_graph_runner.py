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


class DecodeInputs:
    """The graphs' static inputs, sized for the largest bucket and the longest context.

    Rows of the buffers that hold no real sequence hold the padding values (module docstring).
    """

    def __init__(
        self, max_batch: int, max_pages: int, max_context_len: int, device: torch.device | str
    ) -> None:
        kw = {"device": device}
        self.max_context_len = max_context_len
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, **kw)  # [max_batch]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, **kw)  # [max_batch]
        self.slots = torch.zeros(max_batch, dtype=torch.int64, **kw)  # [max_batch]
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, **kw)  # [max_batch]
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, **kw)
        self.logit_idx = torch.arange(max_batch, dtype=torch.int64, **kw)  # one token per row
        self.extend_lens = torch.ones(max_batch, dtype=torch.int32, **kw)  # [max_batch]
        self.extend_starts = torch.arange(max_batch, dtype=torch.int32, **kw)  # [max_batch]
        # Rows at or past this hold padding values; rows below may hold an earlier batch's data.
        self._num_dirty_rows = 0

    def batch(self, bs: int) -> ForwardBatch:
        """The first bs rows as a decode batch: what a graph of size bs is captured on."""
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            slots=self.slots[:bs],
            page_table=self.page_table[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[1] * bs,
            extend_lens_cpu=[1] * bs,
            logit_idx=self.logit_idx[:bs],
            is_decode=True,
            extend_lens=self.extend_lens[:bs],
            extend_starts=self.extend_starts[:bs],
            max_extend_len=1,
            max_seq_len=self.max_context_len,  # fixes the decode kernel's split count
        )

    def load(self, fb: ForwardBatch) -> None:
        """Copy a decode batch into the first rows; every row after it holds padding values."""
        bsz, num_pages = fb.batch_size, fb.page_table.shape[1]
        self.input_ids[:bsz].copy_(fb.input_ids)
        self.positions[:bsz].copy_(fb.positions)
        self.slots[:bsz].copy_(fb.slots)
        self.seq_lens[:bsz].copy_(fb.seq_lens)
        # Columns past num_pages keep stale page ids, but no row reads past its own seq_len.
        self.page_table[:bsz, :num_pages].copy_(fb.page_table)
        if self._num_dirty_rows > bsz:  # a larger batch wrote these rows: make them padding again
            end = self._num_dirty_rows
            self.input_ids[bsz:end].zero_()
            self.positions[bsz:end].zero_()
            self.slots[bsz:end].zero_()
            self.seq_lens[bsz:end].fill_(1)
            self.page_table[bsz:end].zero_()
        self._num_dirty_rows = bsz


class CudaGraphRunner:
    """Captures `model_runner.model` on decode batches; `replay` returns logits [B, V] float32.

    Does nothing (can_run is always False) when the attention backend's decode cannot be captured.
    """

    def __init__(self, model_runner: ModelRunner) -> None:
        config = model_runner.config
        self.model = model_runner.model
        self.kv_pool = model_runner.kv_pool
        self.device = model_runner.device
        self.max_context_len = (
            config.scheduler.max_context_len or model_runner.model_config.max_position_embeddings
        )
        self.max_pages = num_table_pages(self.max_context_len, model_runner.page_size)
        max_batch = min(config.cuda_graph_max_batch, config.scheduler.max_running_requests)
        self.batch_sizes: list[int] = []  # captured, ascending
        # (bs, with LoRA) -> graph, and its output [bs, V] float32 in the graph pool
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.lora_inputs: LoraGraphInputs | None = None
        attention = self.model.attention
        if not attention.supports_cuda_graph:
            logger.info("CUDA graphs off: attention backend %r cannot be captured", attention.name)
            return
        sizes = capture_batch_sizes(max_batch)
        self.inputs = DecodeInputs(sizes[-1], self.max_pages, self.max_context_len, self.device)
        if model_runner.lora is not None:
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
            "captured %d CUDA graphs (decode batch sizes %s%s, contexts up to %d) in %.1f s",
            len(self.graphs),
            self.batch_sizes,
            ", with and without LoRA" if self.lora_inputs is not None else "",
            self.max_context_len,
            time.perf_counter() - start,
        )

    def _capture_one(self, batch: ForwardBatch, key: tuple[int, bool], pool: object) -> None:
        for _ in range(_NUM_WARMUP_RUNS):
            self.model(batch, self.kv_pool)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[key] = self.model(batch, self.kv_pool)
        self.graphs[key] = graph

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            bool(self.batch_sizes)
            and fb.is_decode
            and fb.batch_size <= self.batch_sizes[-1]
            and (fb.max_seq_len or 0) <= self.max_context_len
            and fb.page_table.shape[1] <= self.max_pages
            and (fb.lora is None or self.lora_inputs is not None)
        )

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [B, V] float32 of a decode batch (can_run(fb) must hold).

        The result lives in the graphs' memory pool: it is valid until the next replay.
        """
        bsz = fb.batch_size
        bs = padded_batch_size(self.batch_sizes, bsz)
        if bs is None or not fb.is_decode:
            raise ValueError(
                f"no CUDA graph for a batch of {bsz} (decode={fb.is_decode}): captured "
                f"decode sizes {self.batch_sizes}"
            )
        self.inputs.load(fb)
        key = (bs, fb.lora is not None)
        if fb.lora is not None:
            if self.lora_inputs is None:
                raise ValueError(
                    "a batch with LoRA adapters, but no graphs were captured with LoRA"
                )
            self.lora_inputs.load(fb.lora)
        self.graphs[key].replay()
        return self.outputs[key][:bsz]
