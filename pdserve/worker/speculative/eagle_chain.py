"""The EAGLE head's chain drafting (topk 1) as one device program, and its CUDA graphs.

`DraftChain` runs the head's steps with the argmax between them on the device: no host sync and
no host-built batch per step, so one CUDA graph per batch-size bucket (`DraftGraphs`) replays a
whole step's drafting. Every row runs every step; a row past its own number of drafts (and a
padded row, which has none) writes the head's KV into slot 0 (page 0, never allocated) and its
later tokens are ignored, so each row's drafts are those of a loop that stops it early.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pdserve.worker.cuda_graph_runner import capture_batch_sizes, padded_batch_size
from pdserve.worker.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from pdserve.worker.kv_pool import KVPool
    from pdserve.worker.models.llama import LlamaForCausalLM
    from pdserve.worker.speculative.eagle_head import EagleHead

logger = logging.getLogger(__name__)

_NUM_WARMUP_RUNS = 2  # the first run compiles the Triton kernels, which must not happen in capture


def page_table_of(page_ids: list[list[int]], width: int) -> torch.Tensor:
    """[B, width] int32 on the host: each row's page ids, then zeros (page 0)."""
    table = torch.zeros(len(page_ids), width, dtype=torch.int32)
    for b, pages in enumerate(page_ids):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    return table


class DraftChain:
    """Greedy drafts of the head for a batch of rows, on the device (module docstring)."""

    def __init__(
        self, head: EagleHead, target: LlamaForCausalLM, pool: KVPool, page_size: int
    ) -> None:
        self.head = head
        self.target = target  # its embeddings, lm_head and rotary cache serve the head
        self.pool = pool
        self.page_size = page_size

    def __call__(
        self,
        feature: torch.Tensor,  # [B, H]: each row's state (the head's output at start - 1)
        start: torch.Tensor,  # [B] int64: the position of each row's first head step
        num_drafts: torch.Tensor,  # [B] int64: drafts each row wants (0: a padded row)
        page_table: torch.Tensor,  # [B, P] int32: each row's pages (the target's page ids)
        num_steps: int,  # drafts per row computed: at least max(num_drafts)
        max_seq_len: int,  # host bound on the head's KV lengths (the decode kernel's splits)
        host_rows: tuple[list[int], list[int]] | None = None,  # start, num_drafts on the host
    ) -> torch.Tensor:  # [B, num_steps] int64: row b's drafts are its first num_drafts[b]
        """host_rows (eager runs) gives each step's batch its true host-side lengths, which a
        backend that plans on the host (FlashInfer's decode) reads; a capture has none."""
        token = self.target.compute_logits(feature).argmax(dim=-1)  # [B]
        tokens = [token]
        for step in range(1, num_steps):
            live = num_drafts > step  # [B]: the row wants another draft after this one
            pos = torch.where(live, start + (step - 1), 0)  # [B]: the last draft's position
            batch = self._step_batch(token, pos, live, page_table, max_seq_len)
            if host_rows is not None:
                batch.seq_lens_cpu = [
                    s + step if n > step else 1 for s, n in zip(*host_rows)
                ]  # fmt: skip
            embeds = self.target.model.embed_tokens(token)  # [B, H]
            feature = self.head(embeds, feature, batch, self.pool, self.target.cos_sin_cache)
            token = self.target.compute_logits(feature).argmax(dim=-1)  # [B]
            tokens.append(token)
        return torch.stack(tokens, dim=1)

    def _step_batch(
        self,
        token: torch.Tensor,  # [B] int64: each row's last draft
        pos: torch.Tensor,  # [B] int64: its position (0 where not live)
        live: torch.Tensor,  # [B] bool: the row's step counts; else its KV goes to slot 0
        page_table: torch.Tensor,  # [B, P] int32
        max_seq_len: int,
    ) -> ForwardBatch:
        """One head step's decode batch, built on the device (no host sync)."""
        bsz, page_size = token.shape[0], self.page_size
        rows = torch.arange(bsz, device=token.device)  # [B]
        page = page_table.gather(1, (pos // page_size)[:, None])[:, 0].long()  # [B]
        return ForwardBatch(
            input_ids=token,
            positions=pos,
            slots=torch.where(live, page * page_size + pos % page_size, 0),  # [B]
            page_table=page_table,
            seq_lens=(pos + 1).int(),
            seq_lens_cpu=[1] * bsz,  # placeholders: a capturable decode reads seq_lens
            extend_lens_cpu=[1] * bsz,
            logit_idx=rows,
            is_decode=True,
            extend_lens=torch.ones_like(rows, dtype=torch.int32),
            extend_starts=rows.int(),
            max_extend_len=1,
            max_seq_len=max_seq_len,
        )


class DraftGraphs:
    """DraftChain captured per batch-size bucket on static inputs, num_steps drafts a row and
    contexts up to max_context_len; rows past a batch have no drafts (padding)."""

    def __init__(
        self,
        chain: DraftChain,
        num_steps: int,
        max_batch: int,
        max_pages: int,
        max_context_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.chain = chain
        self.num_steps = num_steps
        self.max_pages = max_pages
        self.max_context_len = max_context_len
        self.feature = torch.zeros(max_batch, hidden_size, dtype=dtype, device=device)  # [B, H]
        self.start = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        self.num_drafts = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        self.page_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.batch_sizes: list[int] = []  # captured, ascending
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bs -> [bs, num_steps] int64
        self.num_replays = 0
        self._capture(capture_batch_sizes(max_batch))

    def run(self, bs: int) -> torch.Tensor:
        """The chain on the first bs rows of the static inputs (what a graph captures)."""
        return self.chain(
            self.feature[:bs],
            self.start[:bs],
            self.num_drafts[:bs],
            self.page_table[:bs],
            self.num_steps,
            self.max_context_len,
        )

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        begin = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(sizes):  # largest first: the smaller graphs reuse its memory
            for _ in range(_NUM_WARMUP_RUNS):
                self.run(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.run(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        self.batch_sizes = sorted(sizes)
        logger.info(
            "captured %d CUDA graphs of the EAGLE head's %d-step drafting (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.num_steps,
            self.batch_sizes,
            time.perf_counter() - begin,
        )

    def can_run(self, bsz: int, num_pages: int, max_num_drafts: int) -> bool:
        return (
            bool(self.batch_sizes)
            and bsz <= self.batch_sizes[-1]
            and num_pages <= self.max_pages
            and max_num_drafts <= self.num_steps
        )

    def load(
        self,
        feature: torch.Tensor,
        start: list[int],
        num_drafts: list[int],
        page_ids: list[list[int]],
    ) -> int:
        """Copy a batch into the first rows, the rest of its bucket padding; returns the bucket."""
        bsz = len(start)
        bs = padded_batch_size(self.batch_sizes, bsz)
        self.feature[:bsz].copy_(feature)
        self.start[:bsz].copy_(torch.tensor(start, dtype=torch.int64))
        self.num_drafts[:bsz].copy_(torch.tensor(num_drafts, dtype=torch.int64))
        self.page_table[:bsz].copy_(page_table_of(page_ids, self.max_pages))
        self.num_drafts[bsz:bs].zero_()  # no drafts: their KV writes go to slot 0
        self.page_table[bsz:bs].zero_()
        return bs

    def replay(
        self,
        feature: torch.Tensor,
        start: list[int],
        num_drafts: list[int],
        page_ids: list[list[int]],
    ) -> torch.Tensor:  # [B, num_steps] int64, in the graphs' pool (valid until the next replay)
        bs = self.load(feature, start, num_drafts, page_ids)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs][: len(start)]
