"""RadixCache: page-granular prefix matching, locking, LRU eviction and page ownership, checked
against a brute-force model of which token prefix every cached page holds."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pdserve.scheduler.page_allocator import PageAllocator
from pdserve.scheduler.radix_cache import MatchResult, NoPrefixCache, RadixCache


def make_cache(page_size: int, num_pages: int = 64) -> tuple[RadixCache, PageAllocator]:
    allocator = PageAllocator(num_pages)
    return RadixCache(page_size, allocator), allocator


def cache_tokens(cache: RadixCache, token_ids: list[int]) -> list[int]:
    """Allocate pages for `token_ids` (whole pages) and insert them, as a finished request would."""
    page_ids = cache.allocator.alloc(len(token_ids) // cache.page_size)
    assert page_ids is not None
    num_cached = cache.insert(token_ids, page_ids).num_present_tokens
    cache.allocator.free(page_ids[: num_cached // cache.page_size])
    return page_ids


def test_match_returns_longest_whole_page_prefix() -> None:
    cache, _ = make_cache(page_size=2)
    page_ids = cache_tokens(cache, [1, 2, 3, 4, 5, 6])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]) == MatchResult(
        page_ids, 6, cache.match_prefix([1, 2, 3, 4, 5, 6]).node
    )
    result = cache.match_prefix([1, 2, 3, 9, 5, 6])  # differs inside the second page
    assert (result.page_ids, result.num_tokens) == (page_ids[:1], 2)
    result = cache.match_prefix([1, 2, 3])  # a trailing partial page never matches
    assert (result.page_ids, result.num_tokens) == (page_ids[:1], 2)
    assert cache.match_prefix([2, 1]).num_tokens == 0
    assert cache.match_prefix([2, 1]).node is cache.root
    cache.check_integrity()


def test_match_ending_inside_an_edge_splits_it_at_a_page_boundary() -> None:
    cache, _ = make_cache(page_size=2)
    page_ids = cache_tokens(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    result = cache.match_prefix([1, 2, 3, 4, 0, 0])
    assert result.page_ids == page_ids[:2]
    assert result.node.key == (1, 2, 3, 4) and result.node.page_ids == page_ids[:2]
    (lower,) = result.node.children.values()
    assert lower.key == (5, 6, 7, 8) and lower.page_ids == page_ids[2:]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).page_ids == page_ids
    cache.check_integrity()


def test_insert_returns_cached_length_and_caller_frees_duplicates() -> None:
    cache, allocator = make_cache(page_size=2)
    first = cache_tokens(cache, [1, 2, 3, 4])
    second = allocator.alloc(3)
    assert second is not None
    inserted = cache.insert([1, 2, 3, 4, 5, 6], second)
    assert inserted.num_present_tokens == 4
    # The tree kept its own pages for the shared prefix and took only the new one.
    assert inserted.match.page_ids == first + second[2:] and inserted.match.num_tokens == 6
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]) == inserted.match
    assert all(allocator.is_allocated(p) for p in second[:2])  # still the caller's
    allocator.free(second[:2])
    assert cache.num_cached_pages == 3
    assert allocator.num_free == allocator.num_total - 3
    cache.check_integrity()


def test_insert_of_pages_from_a_locked_match_shares_them() -> None:
    cache, allocator = make_cache(page_size=1)
    prefix_pages = cache_tokens(cache, [7, 8])
    match = cache.match_prefix([7, 8, 9])
    cache.lock(match.node)
    new_pages = allocator.alloc(1)
    assert new_pages is not None
    assert cache.insert([7, 8, 9], match.page_ids + new_pages).num_present_tokens == 2
    cache.unlock(match.node)
    # The caller allocated none of page_ids[:2], so it frees nothing.
    assert cache.match_prefix([7, 8, 9]).page_ids == prefix_pages + new_pages
    assert allocator.num_free + cache.num_cached_pages == allocator.num_total
    cache.check_integrity()


def test_insert_refuses_bad_arguments_without_taking_pages() -> None:
    cache, allocator = make_cache(page_size=2)
    cached = cache_tokens(cache, [1, 2])
    page_ids = allocator.alloc(2)
    assert page_ids is not None
    with pytest.raises(ValueError, match="page_size"):
        cache.insert([1, 2, 3], page_ids)
    with pytest.raises(ValueError, match="twice"):
        cache.insert([5, 6, 7, 8], [page_ids[0], page_ids[0]])
    allocator.free(page_ids[1:])
    with pytest.raises(ValueError, match="not allocated"):
        cache.insert([5, 6, 7, 8], page_ids)
    with pytest.raises(ValueError, match="already cached"):
        cache.insert([5, 6, 7, 8], [page_ids[0], cached[0]])
    assert cache.num_cached_pages == 1
    cache.check_integrity()


def test_evict_frees_least_recently_used_leaf_first() -> None:
    cache, allocator = make_cache(page_size=2)
    old = cache_tokens(cache, [1, 1, 1, 1])
    new = cache_tokens(cache, [2, 2, 2, 2])
    assert cache.evict(2) == 2
    assert not any(allocator.is_allocated(p) for p in old)
    assert all(allocator.is_allocated(p) for p in new)


def test_match_refreshes_lru_so_the_other_leaf_goes_first() -> None:
    cache, allocator = make_cache(page_size=2)
    old = cache_tokens(cache, [1, 1, 1, 1])
    new = cache_tokens(cache, [2, 2, 2, 2])
    assert cache.match_prefix([1, 1, 1, 1]).page_ids == old
    assert cache.evict(2) == 2
    assert not any(allocator.is_allocated(p) for p in new)
    assert all(allocator.is_allocated(p) for p in old)
    cache.check_integrity()


def test_evict_takes_the_unused_tail_of_a_partly_matched_sequence_first() -> None:
    cache, allocator = make_cache(page_size=1)
    long = cache_tokens(cache, [1, 2, 3, 4])
    short = cache_tokens(cache, [5, 6])
    cache.match_prefix([1, 2])  # uses only the head of the oldest sequence
    assert cache.evict(4) == 4
    assert not any(allocator.is_allocated(p) for p in long[2:] + short)
    assert all(allocator.is_allocated(p) for p in long[:2])
    cache.check_integrity()


def test_evict_trims_a_leaf_page_by_page_from_its_end() -> None:
    cache, allocator = make_cache(page_size=2)
    page_ids = cache_tokens(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.evict(1) == 1
    assert not allocator.is_allocated(page_ids[3])
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).page_ids == page_ids[:3]
    cache.check_integrity()


def test_locked_pages_are_never_evicted() -> None:
    cache, allocator = make_cache(page_size=1)
    cache_tokens(cache, [1, 2, 3])
    other = cache_tokens(cache, [1, 5, 6])
    match = cache.match_prefix([1, 2, 3])
    cache.lock(match.node)
    assert cache.num_evictable_pages == 2
    assert cache.evict(100) == 2
    assert all(allocator.is_allocated(p) for p in match.page_ids)
    assert not any(allocator.is_allocated(p) for p in other[1:])
    cache.unlock(match.node)
    assert cache.num_evictable_pages == 3
    assert cache.reset() == 3 and cache.num_cached_pages == 0
    assert allocator.num_free == allocator.num_total
    cache.check_integrity()


def test_lock_survives_a_split_of_the_locked_edge() -> None:
    cache, _ = make_cache(page_size=1)
    cache_tokens(cache, [1, 2, 3, 4])
    match = cache.match_prefix([1, 2, 3, 4])
    cache.lock(match.node)
    cache.match_prefix([1, 2, 9])  # splits the locked edge above the handle
    cache.check_integrity()
    assert cache.evict(100) == 0
    cache.unlock(match.node)
    cache.check_integrity()
    assert cache.evict(100) == 4


def test_unlock_without_lock_and_lock_of_evicted_node_raise() -> None:
    cache, _ = make_cache(page_size=1)
    cache_tokens(cache, [1, 2])
    match = cache.match_prefix([1, 2])
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(match.node)
    cache.evict(2)
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(match.node)


def test_reset_keeps_locked_pages() -> None:
    cache, _ = make_cache(page_size=2)
    cache_tokens(cache, [1, 2, 3, 4])
    cache_tokens(cache, [5, 6])
    match = cache.match_prefix([1, 2])
    cache.lock(match.node)
    assert cache.reset() == 2
    assert cache.num_cached_pages == 1 == cache.num_locked_pages
    cache.check_integrity()


def test_hit_rate_counts_matched_over_queried_tokens() -> None:
    cache, _ = make_cache(page_size=2)
    assert cache.hit_rate == 0.0
    cache_tokens(cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    cache.match_prefix([9, 9])
    assert (cache.num_matched_tokens, cache.num_queried_tokens) == (4, 10)
    assert cache.hit_rate == pytest.approx(0.4)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c, a: a.free([c.root.children[(1, 2)].page_ids[0]]), "free in the allocator"),
        (lambda c, a: setattr(c.root.children[(1, 2)], "ref_count", -1), "negative ref count"),
        (lambda c, a: setattr(c.root.children[(1, 2)], "ref_count", 1), "children's sum|evictable"),
        (lambda c, a: c.root.children[(1, 2)].page_ids.pop(), "tokens for"),
        (lambda c, a: setattr(c, "_num_evictable_pages", 0), "evictable"),
        (lambda c, a: c.root.children.update({(7, 7): c.root.children[(1, 2)]}), "bad link"),
        (
            lambda c, a: c.root.children[(5, 6)].page_ids.__setitem__(
                0, c.root.children[(1, 2)].page_ids[0]
            ),
            "twice",
        ),
    ],
)
def test_check_integrity_detects_corruption(corrupt, message: str) -> None:
    cache, allocator = make_cache(page_size=2)
    cache_tokens(cache, [1, 2, 3, 4])
    cache_tokens(cache, [5, 6])
    cache.check_integrity()
    corrupt(cache, allocator)
    with pytest.raises(RuntimeError, match=message):
        cache.check_integrity()


def test_no_prefix_cache_never_matches_and_leaves_every_page_with_the_caller() -> None:
    allocator = PageAllocator(8)
    cache = NoPrefixCache(2, allocator)
    page_ids = allocator.alloc(2)
    assert page_ids is not None
    inserted = cache.insert([1, 2, 3, 4], page_ids)
    assert inserted.num_present_tokens == 0 and inserted.match.page_ids == []
    assert all(allocator.is_allocated(p) for p in page_ids)  # still the caller's to free
    result = cache.match_prefix([1, 2, 3, 4])
    assert (result.page_ids, result.num_tokens) == ([], 0)
    cache.lock(result.node)
    cache.unlock(result.node)
    assert cache.evict(5) == 0 and cache.num_cached_pages == cache.num_locked_pages == 0
    with pytest.raises(ValueError, match="page_size"):
        cache.insert([1, 2, 3], page_ids)


# --- randomized comparison with a brute-force model ---


@dataclass
class Request:
    token_ids: list[int]  # whole pages only
    match: MatchResult  # locked for the request's lifetime
    private_page_ids: list[int]  # allocated by the request, one per page after the match


class Model:
    """What the tree should hold: for every cached page, the token prefix ending at that page."""

    def __init__(self, cache: RadixCache, allocator: PageAllocator) -> None:
        self.cache = cache
        self.allocator = allocator
        self.page_prefix: dict[int, tuple[int, ...]] = {}
        self.running: list[Request] = []

    def longest_prefix(self, token_ids: list[int]) -> int:
        ps = self.cache.page_size
        prefixes = set(self.page_prefix.values())
        num_pages = 0
        while (num_pages + 1) * ps <= len(token_ids) and tuple(
            token_ids[: (num_pages + 1) * ps]
        ) in prefixes:
            num_pages += 1
        return num_pages * ps

    def check_match(self, token_ids: list[int]) -> MatchResult:
        result = self.cache.match_prefix(token_ids)
        ps = self.cache.page_size
        assert result.num_tokens == self.longest_prefix(token_ids)
        assert len(result.page_ids) * ps == result.num_tokens
        for i, page_id in enumerate(result.page_ids):
            assert self.page_prefix[page_id] == tuple(token_ids[: (i + 1) * ps])
        if result.page_ids:
            assert result.node.page_ids[-1] == result.page_ids[-1]
        else:
            assert result.node is self.cache.root
        return result

    def locked_page_ids(self) -> set[int]:
        return {p for request in self.running for p in request.match.page_ids}

    def evict(self, num_pages: int | None) -> None:
        """Evict `num_pages` pages, or reset the cache if None, and check what went."""
        locked = self.locked_page_ids()
        num_evictable = len(self.page_prefix) - len(locked)
        num_freed = self.cache.reset() if num_pages is None else self.cache.evict(num_pages)
        num_pages = num_evictable if num_pages is None else num_pages
        freed = {p for p in self.page_prefix if not self.allocator.is_allocated(p)}
        assert num_freed == len(freed) == min(num_pages, num_evictable)
        assert not freed & locked
        for page_id in freed:
            del self.page_prefix[page_id]

    def start(self, token_ids: list[int]) -> None:
        match = self.check_match(token_ids)
        self.cache.lock(match.node)
        request = Request(token_ids, match, [])
        self.running.append(request)  # its match is locked from here on
        num_new = len(token_ids) // self.cache.page_size - len(match.page_ids)
        if num_new > self.allocator.num_free:
            self.evict(num_new - self.allocator.num_free)
        private = self.allocator.alloc(num_new)
        if private is None:
            self.cache.unlock(match.node)
            self.running.remove(request)
            return
        request.private_page_ids = private

    def finish(self, request: Request) -> None:
        ps = self.cache.page_size
        page_ids = request.match.page_ids + request.private_page_ids
        expected = self.longest_prefix(request.token_ids)
        assert expected >= request.match.num_tokens
        inserted = self.cache.insert(request.token_ids, page_ids)
        num_cached = inserted.num_present_tokens
        assert num_cached == expected
        self.allocator.free(page_ids[len(request.match.page_ids) : num_cached // ps])
        for i in range(num_cached // ps, len(page_ids)):
            self.page_prefix[page_ids[i]] = tuple(request.token_ids[: (i + 1) * ps])
        # What the cache holds of the sequence now: its older pages, then the ones it just took.
        assert inserted.match.num_tokens == len(request.token_ids)
        assert inserted.match.page_ids[num_cached // ps :] == page_ids[num_cached // ps :]
        for i, page_id in enumerate(inserted.match.page_ids):
            assert self.page_prefix[page_id] == tuple(request.token_ids[: (i + 1) * ps])
        self.cache.unlock(request.match.node)
        self.running.remove(request)

    def check_invariants(self) -> None:
        self.cache.check_integrity()
        num_private = sum(len(r.private_page_ids) for r in self.running)
        assert (
            self.allocator.num_free + self.cache.num_cached_pages + num_private
            == self.allocator.num_total
        )
        assert self.cache.num_cached_pages == len(self.page_prefix)
        assert self.cache.num_evictable_pages == len(self.page_prefix) - len(self.locked_page_ids())
        ps = self.cache.page_size
        prefixes = set(self.page_prefix.values())
        for prefix in prefixes:  # eviction only ever removes the ends of cached sequences
            assert len(prefix) == ps or prefix[:-ps] in prefixes


def random_sequence(rng: random.Random, bases: list[list[int]], page_size: int) -> list[int]:
    tokens = rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randint(0, 12))]
    return tokens[: len(tokens) // page_size * page_size]


def run_random_ops(seed: int, page_size: int, num_ops: int = 300) -> None:
    rng = random.Random(seed)
    allocator = PageAllocator(40)
    cache = RadixCache(page_size, allocator)
    model = Model(cache, allocator)
    bases = [[rng.randrange(3) for _ in range(rng.randint(0, 12))] for _ in range(4)]
    for _ in range(num_ops):
        op = rng.random()
        if op < 0.35:
            model.start(random_sequence(rng, bases, page_size))
        elif op < 0.7 and model.running:
            model.finish(rng.choice(model.running))
        elif op < 0.85:
            query = random_sequence(rng, bases, page_size)
            model.check_match(query + [rng.randrange(3) for _ in range(rng.randint(0, 3))])
        elif op < 0.98:
            model.evict(rng.randint(0, 10))
        else:
            model.evict(None)  # reset
        model.check_invariants()
    while model.running:
        model.finish(model.running[0])
    model.check_invariants()
    model.evict(allocator.num_total)
    assert allocator.num_free == allocator.num_total


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_random_ops_match_the_brute_force_model(page_size: int) -> None:
    for seed in range(20):
        run_random_ops(seed, page_size)
