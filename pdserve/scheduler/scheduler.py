"""Continuous batching: which tokens of which requests go into the next forward pass.

Each step, under a token budget (max_batch_tokens): every running request that is decoding gets one
token first (so a long prompt never stalls running streams), then prefill work fills the rest in
pieces of at most chunk_size tokens: unfinished chunked prefills first, then newly admitted requests.
A step that carries decodes takes at most decode_step_prefill_tokens prompt tokens (Sarathi-Serve's
stall-free batching), so the streams' time per token stays bounded while prompts keep moving.
Waiting requests are admitted by priority, first come first served within one (`WaitingQueue`: online
requests before Batch API lines).
With LoRA, a batch never holds more distinct adapters than the worker has adapter slots
(`max_loras_per_batch`): a waiting request whose adapter would exceed that waits at the head of the
queue until a running adapter's requests end. Prefix-cache keys are token ids offset by the
request's adapter namespace (`Request.lora_key`), so KV is only shared under one adapter.
When a decode cannot get a page, the newest request of the lowest priority is preempted: its pages
are freed and it is recomputed later from its prompt and the tokens it already produced.

Page ownership (see request.py): pages are free in the allocator, owned by one request, or owned by
the prefix cache (shared by requests that lock the node). With prefix caching off the cache is a
`NoPrefixCache`, which never takes a page, so there is one path either way. A decode worker's
requests wait for their KV outside the scheduler (`kv_handoff.KVHandoff`) and join `running` through
`commit_transferred`: `running` holds only requests that run.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.config.engine_config import SchedulerConfig
from pdserve.multimodal.cache_key import image_keyed_ids
from pdserve.protocol import Finish, KVReady
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.page_allocator import PageAllocator
from pdserve.scheduler.radix_cache import NoPrefixCache, PrefixCache, RadixCache
from pdserve.scheduler.request import Request, Status
from pdserve.scheduler.waiting_queue import WaitingQueue

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchItem:
    req: Request
    start: int  # position of the first new token (== req.num_computed when scheduled)
    num_tokens: int  # new tokens of this request in the step

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last pending token, so a token is sampled."""
        return self.start + self.num_tokens == self.req.seq_len


@dataclass
class ScheduledBatch:
    items: list[BatchItem]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def is_decode(self) -> bool:
        return all(item.num_tokens == 1 for item in self.items)


# Token ids are below 2**32; an adapter's namespace shifts them above, so keys never collide.
_LORA_KEY_SHIFT = 32
# A pool of N pages evicts at least N // 128 pages when it must (a pool under 128: what it needs).
_EVICTION_BATCH_DIVISOR = 128


def _cache_key(req: Request, token_ids: list[int]) -> list[int]:
    """The prefix cache's key for req's tokens: the ids themselves for the base model, offset
    into the adapter's namespace otherwise; image placeholders keyed by their image's hash."""
    if req.mm is not None:
        token_ids = image_keyed_ids(token_ids, req.mm)
    if req.lora_key == 0:
        return token_ids
    offset = req.lora_key << _LORA_KEY_SHIFT
    return [t + offset for t in token_ids]


def _preemption_order(req: Request) -> tuple[int, int]:
    """The largest is preempted first: the lowest priority, then the newest admitted."""
    return -req.priority, req.admit_seq


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_pages: int,
        finish_checker: FinishChecker,
        max_context_len: int,
        max_loras_per_batch: int | None = None,
    ) -> None:
        self.config = config
        self.max_loras_per_batch = max_loras_per_batch  # None: no LoRA, no limit
        self._reserved_loras: Counter[str] = Counter()  # decode role: adapters of KV in flight
        self.page_size = config.page_size
        self.allocator = PageAllocator(num_pages)
        cache_class = RadixCache if config.enable_prefix_cache else NoPrefixCache
        self.cache: PrefixCache = cache_class(config.page_size, self.allocator)
        self.finish_checker = finish_checker
        self.max_context_len = max_context_len
        self.waiting: WaitingQueue[Request] = WaitingQueue(lambda req: req.priority)
        self.running: list[Request] = []  # admission order; every one holds pages and runs
        self.requests: dict[str, Request] = {}
        self._admit_counter = itertools.count()
        self.num_preemptions = 0
        self.newly_finished: list[Request] = []  # ended inside schedule(); the owner drains it
        # Called before pages are handed to another process to write (decode role): the owner
        # waits there for a device step still writing into pages freed while it ran.
        self.before_remote_write: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ intake and abort

    def check_fits(self, req: Request) -> None:
        """ValueError if the request can never run here (id reused, or larger than the pool)."""
        if req.rid in self.requests:
            raise ValueError(f"request id {req.rid!r} is already in use")
        if self._pages_for(req.seq_len + 1) > self.allocator.num_total:
            raise ValueError(
                f"the prompt ({req.seq_len} tokens) does not fit in the KV cache "
                f"({self.allocator.num_total * self.page_size} tokens)"
            )

    def add(self, req: Request) -> None:
        """Queue a request; ValueError if it can never fit."""
        self.check_fits(req)
        self.requests[req.rid] = req
        req.status = Status.WAITING
        self.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted", status_code: int = 400) -> Request | None:
        """Stop a request wherever it is and free its pages; returns it (None if unknown).
        status_code: what its client gets (400: its own fault or asked for; 500: the server's)."""
        req = self.requests.get(rid)
        if req is None:
            return None
        if req.status == Status.WAITING:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        req.finish = Finish.abort(message, status_code)
        self.release(req)
        return req

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_batch_tokens
        items: list[BatchItem] = []
        budget = self._schedule_decodes(items, budget)
        budget = self._schedule_running_prefills(items, self._prefill_budget(items, budget))
        self._admit_waiting(items, budget)
        return ScheduledBatch(items) if items else None

    def _prefill_budget(self, items: list[BatchItem], budget: int) -> int:
        """The prompt tokens this step may still take: with decodes in it, at most
        decode_step_prefill_tokens, so their step stays short; prefill still moves every step."""
        cap = self.config.decode_step_prefill_tokens
        return min(budget, cap) if items and cap > 0 else budget

    def _schedule_decodes(self, items: list[BatchItem], budget: int) -> int:
        num_preemptions = self.num_preemptions
        for req in list(self.running):
            if budget <= 0:
                break
            # status, not list membership: a request preempted earlier in this loop is WAITING
            seq_len = req.seq_len
            if req.status != Status.RUNNING or seq_len - req.num_computed != 1:
                continue
            if len(req.page_ids) * self.page_size < seq_len and not self._ensure_pages(
                req, seq_len, preempt=True
            ):
                continue  # req itself was preempted
            items.append(BatchItem(req, req.num_computed, 1))
            budget -= 1
        if self.num_preemptions != num_preemptions:
            # A request scheduled earlier in the loop may have been preempted for a later one of
            # higher priority: its pages are gone, so it leaves the step.
            kept = [item for item in items if item.req.status == Status.RUNNING]
            budget += len(items) - len(kept)
            items[:] = kept
        return budget

    def _schedule_running_prefills(self, items: list[BatchItem], budget: int) -> int:
        if len(items) == len(self.running):  # every running request decodes (items: decodes)
            return budget
        scheduled = {id(item.req) for item in items}
        for req in self.running:
            if budget <= 0:
                break
            if id(req) in scheduled or req.num_pending <= 1:
                continue
            budget -= self._schedule_chunk(req, items, budget)
        return budget

    def _admit_waiting(self, items: list[BatchItem], budget: int) -> None:
        if not self.waiting or budget <= 0 or len(self.running) >= self.config.max_running_requests:
            return  # (a burst's usual step) before counting what the running requests are owed
        promised = sum(self._pages_owed(r) for r in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            if not self._can_admit(req, promised):
                break
            self.waiting.popleft()
            self._match_prefix(req)
            req.status = Status.RUNNING
            req.admit_seq = next(self._admit_counter)
            self.running.append(req)
            used = self._schedule_chunk(req, items, budget)
            budget -= used
            promised += self._pages_owed(req)

    def _pages_owed(self, req: Request) -> int:
        """Pages a running request still takes to cover what it holds now (a chunked prefill's
        later chunks): admission leaves them free, or prefills admitted together could hold
        part of their prompts each and wait for pages forever."""
        return max(0, self._pages_for(req.seq_len) - len(req.page_ids))

    def _schedule_chunk(self, req: Request, items: list[BatchItem], budget: int) -> int:
        num = min(req.num_pending, self.config.chunk_size, budget)
        if num <= 0 or not self._ensure_pages(req, req.num_computed + num, preempt=False):
            return 0
        items.append(BatchItem(req, req.num_computed, num))
        return num

    def _can_admit(self, req: Request, promised: int) -> bool:
        """Room for the whole pending prompt (counting evictable cache pages) beside the pages
        promised to running requests, so admitted prefills rarely have to wait for pages."""
        need = self._pages_for(req.seq_len)
        return self._num_available_pages() - promised >= need and self._has_lora_room(req)

    def _has_lora_room(self, req: Request) -> bool:
        """Whether req's adapter can join without more distinct adapters than slots."""
        if req.lora_name is None or self.max_loras_per_batch is None:
            return True
        in_use = self._loras_holding_slots()
        return req.lora_name in in_use or len(in_use) < self.max_loras_per_batch

    def _loras_holding_slots(self) -> set[str]:
        """Adapters of running requests and of KV in flight: each holds a batch slot."""
        in_use = {r.lora_name for r in self.running if r.lora_name is not None}
        in_use.update(name for name, n in self._reserved_loras.items() if n > 0)
        return in_use

    def lora_in_use(self, name: str) -> bool:
        """Whether a request of this worker's scheduler runs, waits or has KV in flight under
        adapter `name`."""
        in_sched = any(r.lora_name == name for r in self.requests.values())
        return in_sched or self._reserved_loras[name] > 0

    # ------------------------------------------------------------------ results

    def process_sampled(
        self,
        item: BatchItem,
        token_id: int,
        logprob: float | None = None,
        top_logprobs: list[list[float]] | None = None,
        advance_grammar: bool = True,
    ) -> None:
        """Record one sampled token; sets req.finish when the request is done. advance_grammar:
        False when the caller feeds the token to the request's grammar matcher itself (and ends
        the request by the grammar's verdict with `end`)."""
        req = item.req
        req.output_ids.append(token_id)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        if top_logprobs is not None:
            req.output_top_logprobs.append(top_logprobs)
        if req.prefill_only:
            req.status = Status.PREFILLED
            self.running.remove(req)
            self._cache_prompt_pages(req)
            return
        finish = self.finish_checker.check(req, advance_grammar)
        if finish is not None:
            self.end(req, finish)

    def end(self, req: Request, finish: Finish) -> None:
        """End a running request that got its last token with `finish`. One already ended by
        `process_sampled` takes the new reason instead (the grammar's verdict on a token, learned
        after the length or stop checks, comes first), unless it was aborted."""
        if req.finish is None:
            self.running.remove(req)
            req.finish = finish
            self.release(req)
        elif not req.finish.is_abort:
            req.finish = finish

    def advance(self, batch: ScheduledBatch) -> None:
        """Mark the step's KV as computed; call before process_sampled."""
        for item in batch.items:
            req = item.req
            req.num_computed = item.start + item.num_tokens
            if req.num_computed == len(req.prompt_ids) and item.samples:
                self._cache_prompt_pages(req)

    # ------------------------------------------------------------------ decode role

    def reserve_for_transfer(self, req: Request, num_in_flight: int) -> list[int] | None:
        """Decode role: pages for the whole prompt, for a prefill worker to push its KV into; None
        when there is no room. The request stays outside the scheduler (in the KV handoff) until
        `commit_transferred`; `num_in_flight` such requests already hold pages and count against
        max_running_requests."""
        if len(self.running) + num_in_flight >= self.config.max_running_requests:
            return None
        if not self._has_lora_room(req):
            return None
        self.before_remote_write()
        pages = self._alloc(self._pages_for(len(req.prompt_ids)))
        if pages is None:
            return None
        req.page_ids = pages
        if req.lora_name is not None:
            self._reserved_loras[req.lora_name] += 1
        return pages

    def free_reserved(self, req: Request) -> None:
        """Decode role: give back the pages of a request that never joined (its KV never came)."""
        self.allocator.free(req.page_ids)
        req.page_ids = []
        req.status = Status.FINISHED
        self._unreserve_lora(req)

    def _unreserve_lora(self, req: Request) -> None:
        if req.lora_name is not None:
            self._reserved_loras[req.lora_name] -= 1
            if self._reserved_loras[req.lora_name] <= 0:
                del self._reserved_loras[req.lora_name]

    def commit_transferred(self, req: Request, ready: KVReady) -> None:
        """Decode role: the prompt's KV has landed in the reserved pages; the request joins the
        running batch with the prefill's first token (which may already end it)."""
        self._unreserve_lora(req)
        root = self.cache.match_prefix([]).node  # nothing shared; holds a lock like every runner
        self.cache.lock(root)
        self.requests[req.rid] = req
        req.cache_node = root
        req.num_computed = len(req.prompt_ids)
        req.num_cached_tokens = ready.cached_tokens
        req.status = Status.RUNNING
        req.admit_seq = next(self._admit_counter)
        self.running.append(req)
        item = BatchItem(req, req.num_computed, 0)
        self.process_sampled(item, ready.first_token, ready.logprob, ready.top_logprobs)

    # ------------------------------------------------------------------ pages

    def _pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def _num_available_pages(self) -> int:
        return self.allocator.num_free + self.cache.num_evictable_pages

    def _alloc(self, num: int) -> list[int] | None:
        if num <= 0:
            return []
        if self.allocator.num_free < num:
            # One eviction walks the whole prefix tree: free a batch of pages at once, so that a
            # full cache under decode load evicts every few dozen steps, not for every new page.
            batch = self.allocator.num_total // _EVICTION_BATCH_DIVISOR
            self.cache.evict(max(num - self.allocator.num_free, batch))
        return self.allocator.alloc(num)

    def _ensure_pages(self, req: Request, num_tokens: int, preempt: bool) -> bool:
        """Give req pages for num_tokens positions; preempt newer requests if allowed and needed.
        Returns False if req has no pages for them (it may have been preempted itself)."""
        need = self._pages_for(num_tokens) - len(req.page_ids)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.page_ids = req.page_ids + pages  # a new list: see Request.page_ids
                return True
            if not preempt:
                return False
            others = [r for r in self.running if r is not req]
            if not others:
                # Alone and still out of pages: the pool cannot hold this sequence at all.
                self.running.remove(req)
                req.finish = Finish.abort(
                    f"the KV cache is too small for this request ({num_tokens} tokens)"
                )
                self.release(req)
                self.newly_finished.append(req)
                return False
            victim = max(others + [req], key=_preemption_order)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def reserve_positions(self, req: Request, num_tokens: int) -> int:
        """Speculative decoding: pages for req's positions below num_tokens if free (or
        evictable) pages allow, never preempting; returns how many positions req has pages for."""
        if self._ensure_pages(req, num_tokens, preempt=False):
            return num_tokens
        return len(req.page_ids) * self.page_size

    def trim_pages(self, req: Request) -> None:
        """Speculative decoding: give back req's own pages past its seq_len (rejected drafts)."""
        keep = max(self._pages_for(req.seq_len), req.num_shared_pages)
        extra = req.page_ids[keep:]
        if extra:
            req.page_ids = req.page_ids[:keep]
            self.allocator.free(extra)

    def _preempt(self, req: Request) -> None:
        logger.info("preempting request %s (%d tokens) for lack of KV pages", req.rid, req.seq_len)
        self.running.remove(req)
        self._free_pages(req)
        req.num_computed = 0
        req.num_cached_tokens = 0
        req.num_inflight = 0  # a token being sampled now is dropped: it is sampled again
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)  # ahead of its own priority: it keeps its place

    def _match_prefix(self, req: Request) -> None:
        # Keep at least one token to compute: its logits give the next token.
        reusable = req.seq_len - 1
        if req.max_reused_tokens is not None:  # hidden states, prompt logprobs, mean pooling
            reusable = min(reusable, req.max_reused_tokens)
        match = self.cache.match_prefix(_cache_key(req, req.all_ids[:reusable]))
        self.cache.lock(match.node)
        req.cache_node = match.node
        req.page_ids = list(match.page_ids)
        req.num_shared_pages = len(match.page_ids)
        req.num_computed = match.num_tokens
        req.num_cached_tokens = min(match.num_tokens, len(req.prompt_ids))

    def _cache_prompt_pages(self, req: Request) -> None:
        """Share the full pages computed so far through the prefix cache (req keeps using them)."""
        self._share_full_pages(req, req.num_computed // self.page_size)

    def _share_full_pages(self, req: Request, num_full: int) -> None:
        """Offer req's first num_full pages to the prefix cache; req goes on reading them through
        a lock on the cache's node. Its pages the cache already held under other ids go back."""
        if num_full <= req.num_shared_pages:
            return
        inserted = self.cache.insert(
            _cache_key(req, req.all_ids[: num_full * self.page_size]), req.page_ids[:num_full]
        )
        duplicates = req.page_ids[
            req.num_shared_pages : inserted.num_present_tokens // self.page_size
        ]
        match = inserted.match
        self.cache.lock(match.node)
        self.cache.unlock(req.cache_node)
        req.cache_node = match.node
        req.page_ids = list(match.page_ids) + req.page_ids[len(match.page_ids) :]
        req.num_shared_pages = len(match.page_ids)
        if duplicates:
            self.allocator.free(duplicates)

    def release(self, req: Request) -> None:
        """A finished or aborted request gives back its pages (full ones to the cache, unless it
        was aborted: its last tokens may never have been computed)."""
        req.status = Status.FINISHED
        self.requests.pop(req.rid, None)
        if req.num_computed > 0 and req.finish is not None and not req.finish.is_abort:
            self._share_full_pages(req, req.num_computed // self.page_size)
        self._free_pages(req)

    def _free_pages(self, req: Request) -> None:
        owned = req.page_ids[req.num_shared_pages :]
        if owned:
            self.allocator.free(owned)
        if req.cache_node is not None:  # None while waiting (new or preempted)
            self.cache.unlock(req.cache_node)
        req.cache_node = None
        req.page_ids = []
        req.num_shared_pages = 0

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.running),
            "num_queued": len(self.waiting),
            "num_free_pages": self.allocator.num_free,
            "num_total_pages": self.allocator.num_total,
            "num_cached_pages": self.cache.num_cached_pages,
            "num_evictable_pages": self.cache.num_evictable_pages,
            "num_preemptions": self.num_preemptions,
            "num_adapter_slots_used": len(self._loras_holding_slots()),
        }
