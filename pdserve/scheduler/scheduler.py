"""Continuous batching: which tokens of which requests go into the next forward pass.

Each step, under a token budget (max_batch_tokens): every running request that is decoding gets one
token first (so a long prompt never stalls running streams), then prefill work fills the rest in
pieces of at most chunk_size tokens: unfinished chunked prefills first, then newly admitted requests.
When a decode cannot get a page, the newest request is preempted: its pages are freed and it is
recomputed later from its prompt and the tokens it already produced.

Page ownership (see request.py): pages are free in the allocator, owned by one request, or owned by
the radix cache (shared by requests that lock the node).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from pdserve.config.engine_config import SchedulerConfig
from pdserve.protocol import Finish
from pdserve.scheduler.finish_checker import FinishChecker
from pdserve.scheduler.page_allocator import PageAllocator
from pdserve.scheduler.radix_cache import RadixCache
from pdserve.scheduler.request import Request, Status

logger = logging.getLogger(__name__)


@dataclass
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


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_pages: int,
        finish_checker: FinishChecker,
        max_context_len: int,
    ) -> None:
        self.config = config
        self.page_size = config.page_size
        self.allocator = PageAllocator(num_pages)
        self.cache = (
            RadixCache(config.page_size, self.allocator) if config.enable_prefix_cache else None
        )
        self.finish_checker = finish_checker
        self.max_context_len = max_context_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.requests: dict[str, Request] = {}
        self._admit_counter = itertools.count()
        self.num_preemptions = 0
        self.newly_finished: list[Request] = []  # ended inside schedule(); the owner drains it

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

    def abort(self, rid: str, message: str = "aborted") -> Request | None:
        """Stop a request wherever it is and free its pages; returns it (None if unknown)."""
        req = self.requests.get(rid)
        if req is None:
            return None
        if req.status == Status.WAITING:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        req.finish = Finish.abort(message)
        self.release(req)
        return req

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.status == Status.RUNNING for r in self.running)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_batch_tokens
        items: list[BatchItem] = []
        budget = self._schedule_decodes(items, budget)
        budget = self._schedule_running_prefills(items, budget)
        self._admit_waiting(items, budget)
        return ScheduledBatch(items) if items else None

    def _schedule_decodes(self, items: list[BatchItem], budget: int) -> int:
        for req in list(self.running):
            if budget <= 0:
                break
            # status, not list membership: a request preempted earlier in this loop is WAITING
            if req.status != Status.RUNNING or req.num_pending != 1:
                continue
            if not self._ensure_pages(req, req.seq_len, preempt=True):
                continue  # req itself was preempted
            items.append(BatchItem(req, req.num_computed, 1))
            budget -= 1
        return budget

    def _schedule_running_prefills(self, items: list[BatchItem], budget: int) -> int:
        scheduled = {id(item.req) for item in items}
        for req in self.running:
            if budget <= 0:
                break
            if req.status != Status.RUNNING or req.num_pending <= 1 or id(req) in scheduled:
                continue
            budget -= self._schedule_chunk(req, items, budget)
        return budget

    def _admit_waiting(self, items: list[BatchItem], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            if not self._can_admit(req):
                break
            self.waiting.popleft()
            self._match_prefix(req)
            req.status = Status.RUNNING
            req.admit_seq = next(self._admit_counter)
            self.running.append(req)
            used = self._schedule_chunk(req, items, budget)
            budget -= used

    def _schedule_chunk(self, req: Request, items: list[BatchItem], budget: int) -> int:
        num = min(req.num_pending, self.config.chunk_size, budget)
        if num <= 0 or not self._ensure_pages(req, req.num_computed + num, preempt=False):
            return 0
        items.append(BatchItem(req, req.num_computed, num))
        return num

    def _can_admit(self, req: Request) -> bool:
        """Room for the whole pending prompt (counting evictable cache pages), so admitted
        prefills rarely have to wait for pages."""
        need = self._pages_for(req.seq_len)
        return self._num_available_pages() >= need

    # ------------------------------------------------------------------ results

    def process_sampled(
        self,
        item: BatchItem,
        token_id: int,
        logprob: float | None = None,
        top_logprobs: list[list[float]] | None = None,
    ) -> None:
        """Record one sampled token; sets req.finish when the request is done."""
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
        req.finish = self.finish_checker.check(req)
        if req.finish is not None:
            self.running.remove(req)
            self.release(req)

    def advance(self, batch: ScheduledBatch) -> None:
        """Mark the step's KV as computed; call before process_sampled."""
        for item in batch.items:
            item.req.num_computed = item.start + item.num_tokens
            if item.samples and item.req.num_computed == len(item.req.prompt_ids):
                self._cache_prompt_pages(item.req)

    # ------------------------------------------------------------------ decode role

    def reserve_for_transfer(self, req: Request) -> list[int] | None:
        """Decode role: allocate pages for the whole prompt before prefill pushes its KV."""
        if len(self.running) >= self.config.max_running_requests:
            return None
        need = self._pages_for(len(req.prompt_ids))
        pages = self._alloc(need)
        if pages is None:
            return None
        self.requests[req.rid] = req
        req.page_ids = pages
        req.status = Status.WAITING_KV
        req.admit_seq = next(self._admit_counter)
        self.running.append(req)
        return pages

    def commit_transferred(
        self,
        req: Request,
        first_token: int,
        cached_tokens: int,
        logprob: float | None,
        top_logprobs: list[list[float]] | None,
    ) -> None:
        """Decode role: the prompt's KV has landed; the request joins the decode batch."""
        req.num_computed = len(req.prompt_ids)
        req.num_cached_tokens = cached_tokens
        req.status = Status.RUNNING
        self.process_sampled(
            BatchItem(req, req.num_computed, 0), first_token, logprob, top_logprobs
        )

    # ------------------------------------------------------------------ pages

    def _pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def _num_available_pages(self) -> int:
        evictable = self.cache.num_evictable_pages if self.cache else 0
        return self.allocator.num_free + evictable

    def _alloc(self, num: int) -> list[int] | None:
        if num <= 0:
            return []
        if self.allocator.num_free < num and self.cache is not None:
            self.cache.evict(num - self.allocator.num_free)
        return self.allocator.alloc(num)

    def _ensure_pages(self, req: Request, num_tokens: int, preempt: bool) -> bool:
        """Give req pages for num_tokens positions; preempt newer requests if allowed and needed.
        Returns False if req has no pages for them (it may have been preempted itself)."""
        need = self._pages_for(num_tokens) - len(req.page_ids)
        while need > 0:
            pages = self._alloc(need)
            if pages is not None:
                req.page_ids.extend(pages)
                return True
            if not preempt:
                return False
            others = [r for r in self.running if r.status == Status.RUNNING and r is not req]
            if not others:
                # Alone and still out of pages: the pool cannot hold this sequence at all.
                self.running.remove(req)
                req.finish = Finish.abort(
                    f"the KV cache is too small for this request ({num_tokens} tokens)"
                )
                self.release(req)
                self.newly_finished.append(req)
                return False
            victim = max(others + [req], key=lambda r: r.admit_seq)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        logger.info("preempting request %s (%d tokens) for lack of KV pages", req.rid, req.seq_len)
        self.running.remove(req)
        self._free_pages(req)
        req.num_computed = 0
        req.num_cached_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _match_prefix(self, req: Request) -> None:
        if self.cache is None:
            return
        # Keep at least one token to compute: its logits give the next token.
        match = self.cache.match_prefix(req.all_ids[: req.seq_len - 1])
        self.cache.lock(match.node)
        req.cache_node = match.node
        req.page_ids = list(match.page_ids)
        req.num_shared_pages = len(match.page_ids)
        req.num_computed = match.num_tokens
        req.num_cached_tokens = min(match.num_tokens, len(req.prompt_ids))

    def _cache_prompt_pages(self, req: Request) -> None:
        """Share the full pages computed so far through the radix cache (req keeps using them)."""
        if self.cache is None:
            return
        num_full = req.num_computed // self.page_size
        if num_full <= req.num_shared_pages:
            return
        tokens = req.all_ids[: num_full * self.page_size]
        self._insert_pages(tokens, req.page_ids[:num_full], req.num_shared_pages)
        match = self.cache.match_prefix(tokens)
        self.cache.lock(match.node)
        self.cache.unlock(req.cache_node)
        req.cache_node = match.node
        req.page_ids[: len(match.page_ids)] = match.page_ids
        req.num_shared_pages = len(match.page_ids)

    def _insert_pages(self, tokens: list[int], pages: list[int], num_shared: int) -> None:
        """Insert; pages the tree already held under other ids are duplicates and go back."""
        num_present = self.cache.insert(tokens, pages) // self.page_size
        duplicates = pages[num_shared:num_present]
        if duplicates:
            self.allocator.free(duplicates)

    def release(self, req: Request) -> None:
        """A finished or aborted request gives back its pages (full ones to the cache)."""
        req.status = Status.FINISHED
        self.requests.pop(req.rid, None)
        if (
            self.cache is not None
            and req.num_computed > 0
            and req.finish is not None
            and not req.finish.is_abort
        ):
            num_full = req.num_computed // self.page_size
            if num_full > req.num_shared_pages:
                tokens = req.all_ids[: num_full * self.page_size]
                self._insert_pages(tokens, req.page_ids[:num_full], req.num_shared_pages)
                req.num_shared_pages = num_full
        self._free_pages(req)

    def _free_pages(self, req: Request) -> None:
        owned = req.page_ids[req.num_shared_pages :]
        if owned:
            self.allocator.free(owned)
        if self.cache is not None and req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = None
        req.page_ids = []
        req.num_shared_pages = 0

    def stats(self) -> dict[str, Any]:
        cache = self.cache
        return {
            "num_running": sum(1 for r in self.running if r.status == Status.RUNNING),
            "num_queued": len(self.waiting)
            + sum(1 for r in self.running if r.status == Status.WAITING_KV),
            "num_free_pages": self.allocator.num_free,
            "num_total_pages": self.allocator.num_total,
            "num_cached_pages": cache.num_cached_pages if cache else 0,
            "num_evictable_pages": cache.num_evictable_pages if cache else 0,
            "num_preemptions": self.num_preemptions,
        }
