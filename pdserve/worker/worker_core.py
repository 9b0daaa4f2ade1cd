"""One worker's engine core: scheduler + model runner + sampler, stepped by its owner.

The owner (the offline Engine, or a worker process of any role) feeds requests in, calls `step()`
and reads back which requests produced tokens or finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, Scheduler
from pdserve.worker.model_runner import ModelRunner
from pdserve.worker.sampler import (
    SamplingRow,
    build_skipping_bad_rows,
    is_plain_greedy,
    row_problem,
    sample,
)

logger = logging.getLogger(__name__)


class WorkerCore:
    def __init__(
        self,
        config: EngineConfig,
        decode: Callable[[Sequence[int]], str] | None = None,
        model_config: ModelConfig | None = None,
    ) -> None:
        self.config = config.resolved()
        self.model_config = model_config or ModelConfig.from_hf(config.model_path)
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, self.model_config)
        sched = self.config.scheduler
        self.max_context_len = sched.max_context_len or self.model_config.max_position_embeddings
        checker = FinishChecker(self.model_config.eos_token_ids, self.max_context_len, decode)
        self.scheduler = Scheduler(sched, self.runner.num_pages, checker, self.max_context_len)
        self.last_step_ms = 0.0
        self.num_steps = 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def step(self) -> list[Request]:
        """Run one forward pass; returns the requests that got a token or finished."""
        sched = self.scheduler
        batch = sched.schedule()
        touched = sched.newly_finished
        sched.newly_finished = []
        if batch is None:
            return touched
        start = time.perf_counter()
        logits = self.runner.forward(batch)  # [B, V] float32
        sched.advance(batch)
        rows = [i for i, item in enumerate(batch.items) if item.samples]
        if rows:
            sampling_items = [batch.items[i] for i in rows]
            if len(rows) < len(batch.items):  # partial prefill chunks sample nothing
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            self._sample_and_record(logits, sampling_items)
            touched.extend(item.req for item in sampling_items)
        self.last_step_ms = (time.perf_counter() - start) * 1e3
        self.num_steps += 1
        return touched

    def _sampling_row(self, req: Request) -> SamplingRow:
        return SamplingRow(
            params=req.sampling,
            prompt_ids=req.prompt_ids,
            output_ids=req.output_ids,
            eos_token_ids=self.eos_token_ids,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
        )

    def _sample_and_record(self, logits: torch.Tensor, items: list[BatchItem]) -> None:
        """Sample a token for each item (logits: [len(items), V]). A row whose own parameters
        cannot be sampled with ends its request alone; the other rows go on."""
        rows = [self._sampling_row(item.req) for item in items]
        if all(is_plain_greedy(row) for row in rows):
            # The common benchmark and eval case: one argmax, one device-to-host copy.
            for item, token_id in zip(items, logits.argmax(dim=-1).tolist()):
                self.scheduler.process_sampled(item, token_id)
            return
        partial = build_skipping_bad_rows(rows, logits.shape[-1], logits.device)
        for bad in partial.bad_rows:
            rid = items[bad.row_idx].req.rid
            logger.warning("request %s: cannot sample: %s", rid, bad.message)
            self.scheduler.abort(rid, f"cannot sample: {bad.message}")
        if partial.batch is None:
            return
        if partial.bad_rows:
            items = [items[i] for i in partial.row_indices]
            logits = logits.index_select(0, torch.tensor(partial.row_indices, device=logits.device))
        out = sample(logits, partial.batch)
        for i, item in enumerate(items):
            logprob = None
            if out.logprobs is not None and item.req.return_logprob:
                logprob = out.logprobs[i]
            top = None
            if out.top_logprobs is not None and item.req.top_logprobs_num > 0:
                ids, lps = out.top_logprobs[i]
                top = [[tid, lp] for tid, lp in zip(ids, lps)]
            self.scheduler.process_sampled(item, out.token_ids[i], logprob, top)

    def check_request(self, req: Request) -> None:
        """ValueError naming the problem if this model cannot serve the request: a prompt token
        or a sampling parameter (a logit_bias id) outside its vocabulary."""
        vocab = self.model_config.vocab_size
        bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range: expected 0..{vocab - 1}")
        problem = row_problem(self._sampling_row(req), vocab)
        if problem is not None:
            raise ValueError(problem)

    def add(self, req: Request) -> None:
        """Queue a request; ValueError (naming the problem) if it can never run."""
        self.check_request(req)
        self.scheduler.add(req)

    def abort(self, rid: str, message: str = "aborted") -> Request | None:
        return self.scheduler.abort(rid, message)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.scheduler.newly_finished)
