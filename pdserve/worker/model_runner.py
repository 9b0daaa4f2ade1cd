"""Owns the model and the KV pool on one device; turns a scheduled batch into logits."""

from __future__ import annotations

import logging
import os

import torch

from pdserve.config import EngineConfig, ModelConfig
from pdserve.scheduler.scheduler import ScheduledBatch
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CPU_POOL_BYTES_MAX = 2 << 30  # a CPU pool is capped: host memory is shared with everything else


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        from pdserve.worker.models import load_model

        self.config = config  # resolved: no "auto" left
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.page_size = config.scheduler.page_size
        self.model = load_model(model_config, config.model_path, self.dtype, self.device)
        self.num_pages = self._decide_num_pages()
        self.kv_pool = KVPool(model_config, self.num_pages, self.page_size, self.dtype, self.device)
        self.graph_runner = None
        if config.cuda_graph and self.device.type == "cuda":
            from pdserve.worker.cuda_graph_runner import CudaGraphRunner

            self.graph_runner = CudaGraphRunner(self)

    def _decide_num_pages(self) -> int:
        sched = self.config.scheduler
        if sched.num_pages is not None:
            return sched.num_pages
        per_page = KVPool.bytes_per_page_for(self.model_config, self.page_size, self.dtype)
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

    def build_forward_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        page_size = self.page_size
        ids, positions, slots, tables, seq_lens, ext_lens = [], [], [], [], [], []
        for item in batch.items:
            req = item.req
            end = item.start + item.num_tokens
            pos = torch.arange(item.start, end, dtype=torch.int64)
            pages = torch.tensor(req.page_ids, dtype=torch.int64)
            ids.append(torch.tensor(req.all_ids[item.start : end], dtype=torch.int64))
            positions.append(pos)
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
            tables.append(req.page_ids)
            seq_lens.append(end)
            ext_lens.append(item.num_tokens)
        max_pages = max(len(t) for t in tables)
        table = torch.zeros((len(tables), max_pages), dtype=torch.int32)
        for row, pages in enumerate(tables):
            table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        ends = torch.tensor(ext_lens, dtype=torch.int64).cumsum(0) - 1
        dev = self.device
        return ForwardBatch(
            input_ids=torch.cat(ids).to(dev, non_blocking=True),
            positions=torch.cat(positions).to(dev, non_blocking=True),
            slots=torch.cat(slots).to(dev, non_blocking=True),
            page_table=table.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=ext_lens,
            logit_idx=ends.to(dev, non_blocking=True),
            is_decode=batch.is_decode,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [B, vocab] float32 on the device, one row per batch item."""
        fb = self.build_forward_batch(batch)
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.replay(fb)
        return self.model(fb, self.kv_pool)
