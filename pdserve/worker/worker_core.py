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
from pdserve.protocol import Finish
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch, Scheduler
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.grammar import bind_grammar
from pdserve.worker.model_runner import ForwardOutput, ModelRunner
from pdserve.worker.pooler import PoolState
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
        self.model_config = model_config or ModelConfig.from_hf(
            config.model_path, is_embedding=config.is_embedding
        )
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, self.model_config)
        sched = self.config.scheduler
        self.max_context_len = sched.max_context_len or self.model_config.max_position_embeddings
        checker = FinishChecker(self.model_config.eos_token_ids, self.max_context_len, decode)
        max_loras = self.config.lora.max_loras_per_batch if self.runner.lora else None
        self.scheduler = Scheduler(
            sched, self.runner.num_pages, checker, self.max_context_len, max_loras
        )
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
        out = None
        if self.model_config.is_embedding or any(_wants_rows(it.req) for it in batch.items):
            out = self.runner.forward_rows(batch)
            logits = out.logits
        else:
            logits = self.runner.forward(batch)  # [B, V] float32
        sched.advance(batch)
        if out is not None:
            self._record_rows(batch, out)
        rows = [i for i, item in enumerate(batch.items) if item.samples]
        if self.model_config.is_embedding:
            touched.extend(self._finish_pooled([batch.items[i] for i in rows]))
            rows = []
        if rows:
            sampling_items = [batch.items[i] for i in rows]
            if len(rows) < len(batch.items):  # partial prefill chunks sample nothing
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            self._sample_and_record(logits, sampling_items)
            touched.extend(item.req for item in sampling_items)
        self.last_step_ms = (time.perf_counter() - start) * 1e3
        self.num_steps += 1
        return touched

    def _record_rows(self, batch: ScheduledBatch, out: ForwardOutput) -> None:
        """Hand each request that asked for rows its slice of the step's hidden states."""
        for item, row_start in zip(batch.items, out.row_starts):
            outputs = item.req.outputs
            rows = out.hidden[row_start : row_start + item.num_tokens]  # [n, hidden]
            if isinstance(outputs, PoolState):
                outputs.add(rows, item.start)
            elif isinstance(outputs, ExtraOutputs) and outputs.wants_rows:
                req = item.req
                outputs.record(
                    rows, item.start, req.all_ids, len(req.prompt_ids), self.runner.compute_logits
                )

    def _finish_pooled(self, items: list[BatchItem]) -> list[Request]:
        """Pooling model: each request whose prompt is done gets its vector and ends."""
        scores = self.runner.compute_scores if self.model_config.num_labels > 0 else None
        done = []
        for item in items:
            req = item.req
            state: PoolState = req.outputs
            state.embedding = state.result(len(req.prompt_ids), self.model_config.normalize, scores)
            req.finish = Finish.stop(None)
            self.scheduler.running.remove(req)
            self.scheduler.release(req)  # full pages stay in the prefix cache
            done.append(req)
        return done

    def _sampling_row(self, req: Request) -> SamplingRow:
        return SamplingRow(
            params=req.sampling,
            prompt_ids=req.prompt_ids,
            output_ids=req.output_ids,
            eos_token_ids=self.eos_token_ids,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            grammar=req.grammar,
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
        self._bind_lora(req)
        bind_grammar(req, self.model_config.vocab_size)

    def _bind_lora(self, req: Request) -> None:
        """Check req's adapter is loaded here and give req its prefix-cache namespace."""
        if req.lora_name is None:
            return
        lora = self.runner.lora
        if lora is None:
            raise ValueError(
                f"lora_path={req.lora_name!r}: this server has no LoRA adapters (launch it with "
                "--lora-paths, or --max-lora-rank to load adapters later)"
            )
        lora.check_known(req.lora_name)
        req.lora_key = lora.cache_keys[req.lora_name]

    def load_lora(self, name: str, path: str) -> list[str]:
        """Load an adapter; returns the loaded names. ValueError naming the problem."""
        if self.runner.lora is None:
            raise ValueError(
                "this server was launched without LoRA: give --lora-paths or --max-lora-rank "
                "(and --lora-target-modules) at launch to load adapters later"
            )
        self.runner.lora.load(name, path)
        return self.runner.lora.names

    def unload_lora(self, name: str) -> list[str]:
        """Unload an adapter no request uses; ValueError if unknown or in use."""
        lora = self.runner.lora
        if lora is None:
            raise ValueError(f"LoRA adapter {name!r} is not loaded: this server has no LoRA")
        lora.check_known(name)
        if self.scheduler.lora_in_use(name):
            raise ValueError(f"LoRA adapter {name!r} is in use by requests in flight: try again")
        lora.unload(name)
        return lora.names

    @property
    def lora_names(self) -> list[str]:
        return self.runner.lora.names if self.runner.lora is not None else []

    def add(self, req: Request) -> None:
        """Queue a generation request; ValueError (naming the problem) if it can never run."""
        if self.model_config.is_embedding:
            raise ValueError(
                "this model is an embedding/reward model: it serves /v1/embeddings, /encode and "
                "/classify, not generation"
            )
        self.check_request(req)
        if isinstance(req.outputs, ExtraOutputs):
            req.max_reused_tokens = req.outputs.first_needed_position()
        self.scheduler.add(req)

    def add_pooled(self, req: Request) -> None:
        """Queue an embedding / score request (one forward pass, no token sampled)."""
        if not self.model_config.is_embedding:
            raise ValueError(
                "this model is a generation model: embeddings and scores need an embedding or "
                "reward model (launch it with --is-embedding)"
            )
        self.check_request(req)
        req.outputs = PoolState(self.model_config.pooling)
        req.max_reused_tokens = req.outputs.first_needed_position()
        self.scheduler.add(req)

    def abort(self, rid: str, message: str = "aborted") -> Request | None:
        return self.scheduler.abort(rid, message)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.scheduler.newly_finished)


def _wants_rows(req: Request) -> bool:
    return isinstance(req.outputs, ExtraOutputs) and req.outputs.wants_rows
