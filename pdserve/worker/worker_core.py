"""One worker's engine core: scheduler + model runner + sampler, stepped by its owner.

The owner (the offline Engine, or a worker process of any role) feeds requests in, calls `step()`
and reads back which requests produced tokens or finished.

Overlapped loop (`overlap_schedule`, on by default for mixed and decode workers): a step schedules
and launches its batch, then reads back the previous step's tokens while the device runs the new
one, so the host's scheduling, batch building and result handling hide behind device work. A
token sampled by the running step is `Request.num_inflight`: its position is already scheduled
and its id reaches the next step's input on the device (`PendingTokens`). A request that finishes
when its token is read back may have computed one more token by then; that one is discarded, so
outputs and stop checks equal the plain loop's. A step holding a grammar or penalty row launches
its forward pass first, then records the running step's tokens (advancing the matchers), then
builds the sampling batch (the grammar bitmask) and samples: the mask is filled while the device
runs the forward pass. With `defer_grammar_draws` (off by default: measured slower) and every row
light (worker/light_sampling.py) the draw is queued even later, once the next step's batch is built
on the host, and the bitmask is filled on a thread meanwhile. With `accept_on_fill_thread` that
thread also feeds the read-back tokens to their matchers first, and their verdicts end requests
when the next step starts (`GrammarAccept`).
A step holding a row that returns logprobs, hidden states or pooled vectors waits for the running
step first and runs unoverlapped.

Tensor parallelism (`config.tp_size > 1`): this core is rank 0; it starts the follower ranks
(worker/parallel/tp_launch.py), which run each step's forward pass as the model runner announces
it. Only rank 0 samples (the logits are gathered on every rank). Such a worker runs the plain
loop: a follower cannot fill input ids from tokens still being sampled on rank 0's device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from pdserve.config.engine_config import EngineConfig, ModelConfig
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch, Scheduler
from pdserve.worker.extra_outputs import ExtraOutputs
from pdserve.worker.grammar import bind_grammar
from pdserve.worker.inflight import GrammarAccept, HostTokens, InflightStep, PendingLength
from pdserve.worker.light_sampling import LightSampler, is_light
from pdserve.worker.model_runner import ModelRunner, PendingTokens
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup
from pdserve.worker.pooler import PoolState, finish_pooled, record_rows
from pdserve.worker.sampler import (
    DeviceSample,
    SamplingRow,
    build_skipping_bad_rows,
    sample_on_device,
)
from pdserve.worker.sampling_checks import row_problem
from pdserve.worker.speculative.factory import make_speculative_decoder
from pdserve.worker.speculative.prompt_hidden import needs_prompt_hidden, record_prompt_hidden
from pdserve.worker.step_rows import (
    device_index,
    is_plain_greedy,
    live_rows,
    needs_host_tokens,
    on_device,
    wants_rows,
)
from pdserve.worker.warm_up import warm_up

logger = logging.getLogger(__name__)


class WorkerCore:
    def __init__(
        self,
        config: EngineConfig,
        decode: Callable[[Sequence[int]], str] | None = None,
        model_config: ModelConfig | None = None,
        overlap: bool | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """overlap: run the overlapped loop (module docstring); None: as the config says.
        tp: this core as rank 0 of a tensor-parallel group made by the caller (EngineFragment),
        whose other ranks follow it; None: start the followers itself when config.tp_size > 1."""
        self.config = config.resolved()
        self.model_config = model_config or ModelConfig.from_hf(
            config.model_path, is_embedding=config.is_embedding
        )
        torch.manual_seed(self.config.seed)
        self.tp_followers = None  # TPFollowers on rank 0 of a tensor-parallel worker
        if tp is not None and tp.size != self.config.tp_size:
            raise ValueError(f"tp_size={self.config.tp_size} is invalid: the group has {tp.size}")
        tp = tp or SINGLE
        if self.config.tp_size > 1 and not tp.is_parallel:
            from pdserve.worker.parallel.tp_launch import TPFollowers

            self.tp_followers = TPFollowers.start(self.config)
            tp = self.tp_followers.group
        self.runner = ModelRunner(self.config, self.model_config, tp)
        sched = self.config.scheduler
        self.max_context_len = self.model_config.context_limit(sched.max_context_len)
        checker = FinishChecker(self.model_config.eos_token_ids, self.max_context_len, decode)
        max_loras = self.config.lora.max_loras_per_batch if self.runner.lora else None
        self.scheduler = Scheduler(
            sched, self.runner.num_pages, checker, self.max_context_len, max_loras
        )
        self.last_step_ms = 0.0
        self.num_steps = 0
        self.light_sampler = LightSampler(self.config.seed, self.runner.draw_graphs)
        # _sample_launched's `defer`. Off: on the H200 the bitmask filled inline beat the fill on
        # a thread (99% / 98% of unconstrained against 96% / 97%, docs/BENCHMARKS.md eleventh
        # session): the thread's hand-overs seem to cost the main thread more than the fill it
        # hides.
        self.defer_grammar_draws = False
        self.accept_on_fill_thread = False  # GrammarAccept in deferred draws' steps (benchmarks)
        # Speculative decoding (worker/speculative/): its steps run the plain loop.
        self.spec = make_speculative_decoder(
            self.config, self.runner, self.scheduler, self._sampling_row, self.max_context_len
        )
        if overlap is None:
            overlap = self.config.overlap_schedule
        self.overlap = overlap and not self.model_config.is_embedding and not tp.is_parallel
        self.overlap = self.overlap and self.spec is None
        self._inflight: InflightStep | None = None
        self.num_overlapped_steps = 0
        self._host_tokens = HostTokens(pin=self.runner.device.type == "cuda")
        self._unsettled: GrammarAccept | None = None  # verdicts applied at the next step's start
        self.scheduler.before_remote_write = self.wait_device
        if self.runner.device.type == "cuda" and not tp.is_parallel:
            warm_up(self)  # compiles the loop's kernels before any client's request

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def step(self) -> list[Request]:
        """Run one forward pass; returns the requests that got a token or finished (overlapped:
        the tokens of the step before)."""
        if self.tp_followers is not None:
            self.tp_followers.check()
        sched = self.scheduler
        if self._unsettled is not None:  # the grammars' verdicts on the last tokens read back
            unsettled, self._unsettled = self._unsettled, None
            sched.newly_finished += unsettled.settle(sched)
        batch = sched.schedule()
        touched = sched.newly_finished
        sched.newly_finished = []
        if batch is not None and self.spec is not None and self.spec.can_run(batch):
            start = time.perf_counter()
            touched += self.spec.run(batch)
            self.last_step_ms = (time.perf_counter() - start) * 1e3
            self.num_steps += 1
            return touched
        if batch is not None and self._can_overlap(batch):
            items, logits, start = self._launch(batch)
            if not any(needs_host_tokens(item.req) for item in items):
                launched = self._sample_launched(items, logits, start)
                touched += self._collect()[0]
            else:
                # Grammar masks and penalties need the running step's tokens: record them while
                # this step's forward pass runs, then build the sampling batch and sample. When
                # the draw is deferred, the matchers take the tokens on the fill thread meanwhile.
                defer = self.defer_grammar_draws and all(is_light(item.req) for item in items)
                collected, accepting = self._collect(defer and self.accept_on_fill_thread)
                touched += collected
                items, logits = live_rows(items, logits)
                launched = self._sample_launched(items, logits, start, defer, accepting)
            self._inflight = launched
            return touched
        touched += self._collect()[0]
        if batch is not None:
            # Requests that ended when the running step's tokens came back leave the batch.
            batch.items = [it for it in batch.items if it.req.finish is None]
            if batch.items:
                touched += self._run(batch)
        return touched

    # ------------------------------------------------------------------ overlapped steps

    def _can_overlap(self, batch: ScheduledBatch) -> bool:
        """Whether every row can run without its request's tokens on the host."""
        if not self.overlap:
            return False
        for item in batch.items:
            req = item.req
            if wants_rows(req) or req.return_logprob or req.top_logprobs_num > 0:
                return False
        return True

    def _launch(self, batch: ScheduledBatch) -> tuple[list[BatchItem], torch.Tensor, float]:
        """Queue the step's forward pass on the device (nothing is waited for); returns the
        rows that sample, their logits [R, V] and the launch time."""
        start = time.perf_counter()
        self.num_overlapped_steps += 1
        prev = self._inflight
        pending = None
        if prev is not None:  # a deferred draw is queued once the batch is built on the host
            pending = PendingTokens(prev.token_ids, prev.row_of, before_read=prev.launch)
        logits = self.runner.forward(batch, pending)  # [B, V] float32
        self.scheduler.advance(batch)
        rows = [i for i, item in enumerate(batch.items) if item.samples]
        if 0 < len(rows) < len(batch.items):  # partial prefill chunks sample nothing
            logits = logits.index_select(0, device_index(rows, logits.device))
        return [batch.items[i] for i in rows], logits, start

    def _sample_launched(
        self,
        items: list[BatchItem],
        logits: torch.Tensor,
        start: float,
        defer: bool = False,
        accepting: GrammarAccept | None = None,
    ) -> InflightStep:
        """Queue the sampling of a launched step's rows; their tokens are read back next step.
        defer: every row is light (the caller checked); the draw is queued when the next step's
        batch is built (`InflightStep.launch`), the bitmask filled on the fill thread meanwhile.
        accepting: read-back tokens being fed to their matchers on that thread, settled here; a
        deferred fill is queued behind them, and a row whose grammar ends then is drawn all the
        same (its matcher not filled) and its token discarded, as any row ending in flight."""
        draw = None
        if defer and items:
            # None when a grammar failed to compile: the general path below ends that request.
            after = accepting.job if accepting is not None else None
            draw = self.light_sampler.prepare(logits, items, background=True, after=after)
        if accepting is not None and draw is not None and accepting.can_wait():
            self._unsettled = accepting  # settled when the next step starts: nothing waits here
        elif accepting is not None:
            accepting.settle(self.scheduler)  # the fill, if any, starts on the thread meanwhile
        if draw is not None:
            draw.hand_over()
            token_ids = torch.empty(len(items), dtype=torch.int64, device=logits.device)
        else:
            if accepting is not None:  # ended rows are not sampled
                items, logits = live_rows(items, logits)
            token_ids = torch.empty(0, dtype=torch.int64, device=logits.device)
            if items:
                kept, sampled = self._sample_rows(logits, items, build_on_host=True)
                # Rows whose own parameters could not be sampled with ended: reported next step.
                self.scheduler.newly_finished += [
                    it.req for it in items if it.req.finish is not None
                ]
                items = kept
                if sampled is not None:
                    token_ids = sampled.token_ids
        for item in items:
            item.req.num_inflight += 1
        epochs = [item.req.num_preemptions for item in items]
        host_ids = self._host_tokens(token_ids.numel())
        step = InflightStep(items, epochs, token_ids, host_ids, None, start, draw)
        if draw is None:
            step.read_back()
        return step

    def _sample_rows(
        self, logits: torch.Tensor, items: list[BatchItem], build_on_host: bool
    ) -> tuple[list[BatchItem], DeviceSample | None]:
        """Sample each item's token on the device (logits: [len(items), V]); returns the items
        sampled and their results (None when none was). A row whose own parameters cannot be
        sampled with ends its request alone and is left out. build_on_host: build the sampling
        batch on the host and copy it without waiting for the step still running (overlapped
        loop); otherwise it is built on the device directly."""
        if all(is_plain_greedy(item.req) for item in items):
            # The common benchmark and eval case: one argmax, no SamplingRow built.
            return items, DeviceSample(self.light_sampler.greedy(logits), None, None, [])
        if all(is_light(item.req) for item in items):  # greedy / temperature, grammars
            token_ids = self.light_sampler.sample(logits, items)
            if token_ids is not None:  # else some grammar failed to compile: ended below
                return items, DeviceSample(token_ids, None, None, [])
        rows = [self._sampling_row(item.req, item.req.num_inflight) for item in items]
        device = logits.device
        # check_request ran row_problem on each request's parameters when it was admitted.
        checked = all(item.req.checked_sampling is item.req.sampling for item in items)
        partial = build_skipping_bad_rows(
            rows, logits.shape[-1], "cpu" if build_on_host else device, checked
        )
        for bad in partial.bad_rows:
            rid = items[bad.row_idx].req.rid
            logger.warning("request %s: cannot sample: %s", rid, bad.message)
            self.scheduler.abort(rid, f"cannot sample: {bad.message}")
        if partial.batch is None:
            return [], None
        if partial.bad_rows:
            items = [items[i] for i in partial.row_indices]
            logits = logits.index_select(0, device_index(partial.row_indices, device))
        batch = on_device(partial.batch, device) if build_on_host else partial.batch
        return items, sample_on_device(logits, batch)

    def _collect(
        self, accept_on_thread: bool = False
    ) -> tuple[list[Request], GrammarAccept | None]:
        """Read back the running step's tokens (waiting for it) and record them.
        accept_on_thread: feed the constrained rows' tokens to their matchers on the fill thread
        while the others are recorded here; returns the requests that got a token, and that
        accept, which the caller settles before it fills a bitmask or returns."""
        step = self._inflight
        if step is None:
            return [], None
        self._inflight = None
        step.launch()
        if step.done is not None:
            step.done.synchronize()
        records = [
            (item, token_id)
            for item, epoch, token_id in zip(step.items, step.epochs, step.host_ids.tolist())
            # not ended meanwhile, nor preempted (its token is sampled again)
            if item.req.finish is None and item.req.num_preemptions == epoch
        ]
        accepting = None
        if accept_on_thread and records:
            accepting = GrammarAccept([(item.req, token) for item, token in records])
        covered = accepting.covered if accepting is not None else ()
        for item, token_id in records:
            item.req.num_inflight -= 1
            self.scheduler.process_sampled(
                item, token_id, advance_grammar=id(item.req) not in covered
            )
        self.last_step_ms = (time.perf_counter() - step.started) * 1e3
        self.num_steps += 1
        return [item.req for item, _ in records], accepting

    def wait_device(self) -> None:
        """Wait until the running step's device work is done (not reading its tokens): pages
        freed while it ran may still be written by it until then."""
        if self._inflight is not None:
            self._inflight.launch()
            if self._inflight.done is not None:
                self._inflight.done.synchronize()

    # ------------------------------------------------------------------ plain steps

    def _run(self, batch: ScheduledBatch) -> list[Request]:
        """One step, waited for: forward, sampling and results."""
        sched = self.scheduler
        touched: list[Request] = []
        start = time.perf_counter()
        out = None
        follows = self.spec is not None and self.spec.wants_hidden  # EAGLE's draft follows
        captures = needs_prompt_hidden(batch)  # an EAGLE decode worker asked for prompt rows
        if (
            self.model_config.is_embedding
            or follows
            or captures
            or any(wants_rows(it.req) for it in batch.items)
        ):
            out = self.runner.forward_rows(batch)
            logits = out.logits
        else:
            logits = self.runner.forward(batch)  # [B, V] float32
        sched.advance(batch)
        if out is not None:
            record_rows(batch, out, self.runner.compute_logits)
        rows = [i for i, item in enumerate(batch.items) if item.samples]
        if self.model_config.is_embedding:
            scores = self.runner.compute_scores if self.model_config.num_labels > 0 else None
            pooled = [batch.items[i].req for i in rows]
            touched.extend(finish_pooled(pooled, sched, self.model_config.normalize, scores))
            rows = []
        if rows:
            sampling_items = [batch.items[i] for i in rows]
            if len(rows) < len(batch.items):  # partial prefill chunks sample nothing
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            self._sample_and_record(logits, sampling_items)
            touched.extend(item.req for item in sampling_items)
        if out is not None and captures:
            record_prompt_hidden(batch, out.hidden, out.row_starts)
        if out is not None and follows:
            self.spec.observe(batch, out.hidden, out.row_starts)
        self.last_step_ms = (time.perf_counter() - start) * 1e3
        self.num_steps += 1
        return touched

    def _sampling_row(self, req: Request, num_pending: int = 0) -> SamplingRow:
        """num_pending: the request's tokens being sampled by a step still running."""
        output_ids = req.output_ids
        if num_pending:
            output_ids = PendingLength(req.output_ids, num_pending)
        return SamplingRow(
            params=req.sampling,
            prompt_ids=req.prompt_ids,
            output_ids=output_ids,
            eos_token_ids=self.eos_token_ids,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            grammar=req.grammar,
        )

    def _sample_and_record(self, logits: torch.Tensor, items: list[BatchItem]) -> None:
        """Sample a token for each item (logits: [len(items), V]). A row whose own parameters
        cannot be sampled with ends its request alone; the other rows go on."""
        items, sampled = self._sample_rows(logits, items, build_on_host=False)
        if sampled is None:
            return
        out = sampled.to_host()
        for i, item in enumerate(items):
            logprob = None
            if out.logprobs is not None and item.req.return_logprob:
                logprob = out.logprobs[i]
            top = None
            if out.top_logprobs is not None and item.req.top_logprobs_num > 0:
                ids, lps = out.top_logprobs[i]
                top = [[tid, lp] for tid, lp in zip(ids, lps)]
            self.scheduler.process_sampled(item, out.token_ids[i], logprob, top)

    def close(self) -> None:
        """Stop the tensor-parallel followers (nothing to do for a single-rank worker)."""
        if self.tp_followers is not None:
            if self.tp_followers.lost is None:
                self.runner.close()  # tells them STOP
            self.tp_followers.stop()
            self.tp_followers = None

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
        req.checked_sampling = req.sampling
        self._bind_lora(req)
        bind_grammar(req, self.model_config.vocab_size, self.config.model_path)

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
        """Whether step() would produce something: a step still running whose requests have
        all ended (their extra tokens are discarded) is not work."""
        inflight = self._inflight
        return (
            self.scheduler.has_work()
            or bool(self.scheduler.newly_finished)
            or self._unsettled is not None
            or (inflight is not None and any(it.req.finish is None for it in inflight.items))
        )
