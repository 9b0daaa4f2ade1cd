"""Prefix cache over token ids at page granularity: requests with equal prefixes share KV pages.

Who owns a KV page, and when it changes hands (`n` = the value `insert` returns):

| step                       | pages                                 | owner afterwards          |
|----------------------------|---------------------------------------|---------------------------|
| `allocator.alloc`          | the request's new pages               | request                   |
| `match_prefix`, `lock`     | the matched pages                     | tree, pinned and shared   |
| `insert` returns n         | `page_ids[n // page_size:]`           | tree                      |
|  (`num_present_tokens`)    | those of `page_ids[:n // page_size]`  | request, which must free  |
|                            | the request allocated itself          | them (duplicates)         |
| `unlock`                   | the matched pages                     | tree, evictable again     |
| `evict`, `reset`           | least recently used unlocked pages    | free                      |
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from pdserve.scheduler.page_allocator import PageAllocator


class Node:
    """A node of the tree and the edge from its parent into it (the root has an empty edge)."""

    __slots__ = ("key", "page_ids", "parent", "children", "ref_count", "last_access", "node_id")

    def __init__(
        self, key: tuple[int, ...], page_ids: list[int], parent: Node | None, node_id: int
    ) -> None:
        self.key = key  # token ids on the edge; len(key) == len(page_ids) * page_size
        self.page_ids = page_ids  # KV pages holding those tokens, in order
        self.parent = parent  # None for the root and for nodes evicted from the tree
        self.children: dict[tuple[int, ...], Node] = {}  # keyed by the child's first page of tokens
        self.ref_count = 0  # locks held on this node or on any node below it
        self.last_access = 0  # logical clock of the last match or insert through this node
        self.node_id = node_id  # breaks ties in the LRU heap

    @property
    def is_leaf(self) -> bool:
        return not self.children


class MatchResult(NamedTuple):
    page_ids: list[int]  # KV pages of the matched prefix, one per page_size tokens
    num_tokens: int  # matched tokens: len(page_ids) * page_size
    node: Node  # deepest matched node (the root if nothing matched); pass it to lock/unlock


class InsertResult(NamedTuple):
    num_present_tokens: int  # leading tokens the cache held before: the caller's pages for them
    #                          are duplicates, which the caller frees
    match: MatchResult  # the cache's pages now holding the inserted tokens (lock match.node first)


class PrefixCache(Protocol):
    """The contract the scheduler relies on; `RadixCache` and `NoPrefixCache` implement it."""

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """Find the longest cached prefix of `token_ids` made of whole pages (a trailing partial
        page never matches). The returned pages stay valid only while `node` is locked: lock it
        before the next `evict`, `reset` or `insert`. Callers that need logits for the last
        prompt token should match `token_ids[:-1]`, so that at least one token is computed."""
        ...

    def lock(self, node: Node) -> None:
        """Pin `node` and its ancestors: their pages are never evicted until `unlock(node)`.
        Locks nest; raises ValueError if `node` is no longer in the tree."""
        ...

    def unlock(self, node: Node) -> None:
        """Undo one `lock(node)`. Raises ValueError if `node` is not locked."""
        ...

    def insert(self, token_ids: Sequence[int], page_ids: Sequence[int]) -> InsertResult:
        """Offer `page_ids`, which hold the KV of `token_ids` (len(token_ids) ==
        len(page_ids) * page_size). n = `num_present_tokens` leading tokens were cached already:
        the cache keeps its own pages for them and never frees the caller's, so the caller still
        owns those of `page_ids[:n // page_size]` that it allocated itself (as opposed to got from
        a locked `match_prefix`) and must free them. `match` is what the cache holds of
        `token_ids` now: the cache owns `page_ids[n // page_size : len(match.page_ids)]`, and the
        caller keeps the pages after `len(match.page_ids)` (all of them when nothing is cached).
        A caller that keeps running locks `match.node` and points its page table at
        `match.page_ids`; hit-rate counters do not count this as a query."""
        ...

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` cached pages that no lock pins, least recently used leaves
        first, back to the allocator. Returns the number freed, fewer if nothing else can go."""
        ...

    def reset(self) -> int:
        """Free every unlocked page (for /flush_cache); locked pages stay. Returns pages freed."""
        ...

    @property
    def num_cached_pages(self) -> int: ...

    @property
    def num_evictable_pages(self) -> int: ...

    @property
    def num_locked_pages(self) -> int: ...

    @property
    def hit_rate(self) -> float: ...

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the violated invariant if the cache is corrupt."""
        ...


class RadixCache:
    """Radix tree whose edges hold whole pages: `PrefixCache`'s contract, on a real tree.

    Each edge's key is a multiple of page_size tokens, and its children are keyed by their first
    page of tokens, so two requests share a page only if they agree on every token up to its end.
    """

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.allocator = allocator
        self._node_ids = itertools.count()
        self._root = Node((), [], None, next(self._node_ids))
        self._clock = 0  # logical time: bumped once per match_prefix / insert
        self._tree_page_ids: set[int] = set()
        self._num_evictable_pages = 0
        self.num_queried_tokens = 0  # hit-rate counters, over match_prefix calls
        self.num_matched_tokens = 0

    @property
    def root(self) -> Node:
        return self._root

    @property
    def num_cached_pages(self) -> int:
        return len(self._tree_page_ids)

    @property
    def num_evictable_pages(self) -> int:
        return self._num_evictable_pages

    @property
    def num_locked_pages(self) -> int:
        return self.num_cached_pages - self._num_evictable_pages

    @property
    def hit_rate(self) -> float:
        """Matched over queried tokens, across all match_prefix calls (0.0 before any)."""
        return self.num_matched_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """See `PrefixCache.match_prefix`. Splits an edge (at a page boundary) when the match ends
        inside it, and marks every node on the path as just used."""
        num_full_tokens = len(token_ids) // self.page_size * self.page_size
        node, num_tokens, page_ids = self._descend(tuple(token_ids[:num_full_tokens]))
        self.num_queried_tokens += len(token_ids)
        self.num_matched_tokens += num_tokens
        return MatchResult(page_ids, num_tokens, node)

    def lock(self, node: Node) -> None:
        for path_node in self._path_to_root(node):
            if path_node.ref_count == 0:
                self._num_evictable_pages -= len(path_node.page_ids)
            path_node.ref_count += 1

    def unlock(self, node: Node) -> None:
        path = self._path_to_root(node)
        if node.ref_count <= 0:
            raise ValueError(f"unlock of node {node.node_id}, which is not locked")
        for path_node in path:
            path_node.ref_count -= 1
            if path_node.ref_count == 0:
                self._num_evictable_pages += len(path_node.page_ids)

    def insert(self, token_ids: Sequence[int], page_ids: Sequence[int]) -> InsertResult:
        """See `PrefixCache.insert`: the caller frees its duplicate pages, never the cache.
        Raises ValueError, before taking any page, if the lengths disagree, a page is free in the
        allocator or repeated, or a page the cache already holds is passed at another position."""
        self._check_insert_args(token_ids, page_ids)
        key = tuple(token_ids)
        node, num_cached_tokens, tree_page_ids = self._descend(key)
        num_cached_pages = num_cached_tokens // self.page_size
        new_page_ids = list(page_ids[num_cached_pages:])
        # A caller page the tree holds is fine only where the tree holds that very page.
        expected = tree_page_ids + [-1] * len(new_page_ids)
        for caller_page, tree_page in zip(page_ids, expected, strict=True):
            if caller_page != tree_page and caller_page in self._tree_page_ids:
                raise ValueError(f"page {caller_page} is already cached for other tokens")
        if new_page_ids:
            leaf = Node(key[num_cached_tokens:], new_page_ids, node, next(self._node_ids))
            leaf.last_access = self._clock
            node.children[leaf.key[: self.page_size]] = leaf
            self._tree_page_ids.update(new_page_ids)
            self._num_evictable_pages += len(new_page_ids)
            node = leaf
        match = MatchResult(tree_page_ids + new_page_ids, len(key), node)
        return InsertResult(num_cached_tokens, match)

    def evict(self, num_pages: int) -> int:
        """See `PrefixCache.evict`. Trims a leaf page by page from its end when only part of it is
        needed, so it frees exactly min(num_pages, num_evictable_pages) pages."""
        if num_pages < 0:
            raise ValueError(f"cannot evict a negative number of pages: {num_pages}")
        heap = [(leaf.last_access, leaf.node_id, leaf) for leaf in self._evictable_leaves()]
        heapq.heapify(heap)
        num_freed = 0
        while heap and num_freed < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            num_freed += self._evict_from_leaf(leaf, num_pages - num_freed)
            assert parent is not None  # only attached, non-root leaves are in the heap
            if parent is not self._root and parent.is_leaf and parent.ref_count == 0:
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        return num_freed

    def reset(self) -> int:
        return self.evict(self._num_evictable_pages)

    def check_integrity(self) -> None:
        """Walk the whole tree and check every invariant against a recount; also checks the
        allocator. Raises RuntimeError naming the first violation."""
        self.allocator.check_integrity()
        root = self._root
        if root.key or root.page_ids or root.parent is not None:
            raise RuntimeError("root must have no key, no pages and no parent")
        seen_page_ids: set[int] = set()
        num_evictable = 0
        stack = [root]
        while stack:
            node = stack.pop()
            self._check_node(node, seen_page_ids)
            if node.ref_count == 0:
                num_evictable += len(node.page_ids)
            stack.extend(node.children.values())
        if seen_page_ids != self._tree_page_ids:
            raise RuntimeError(
                f"tree holds {len(seen_page_ids)} pages but the cached-page set has "
                f"{len(self._tree_page_ids)}"
            )
        if num_evictable != self._num_evictable_pages:
            raise RuntimeError(
                f"recount finds {num_evictable} evictable pages, counter says "
                f"{self._num_evictable_pages}"
            )

    # --- internals ---

    def _descend(self, key: tuple[int, ...]) -> tuple[Node, int, list[int]]:
        """Walk down along page-aligned `key` as far as it matches, splitting the last edge if the
        match ends inside it. Returns (deepest matched node, matched tokens, their pages)."""
        self._clock += 1
        node = self._root
        node.last_access = self._clock
        num_tokens = 0
        page_ids: list[int] = []
        while num_tokens < len(key):
            child = node.children.get(key[num_tokens : num_tokens + self.page_size])
            if child is None:
                break
            num_pages = self._num_matching_pages(child.key, key, num_tokens)
            if num_pages < len(child.page_ids):
                child = self._split(child, num_pages)
            child.last_access = self._clock
            page_ids.extend(child.page_ids)
            num_tokens += len(child.key)
            node = child
        return node, num_tokens, page_ids

    def _num_matching_pages(
        self, edge_key: tuple[int, ...], key: tuple[int, ...], start: int
    ) -> int:
        """Whole pages on which `edge_key` agrees with `key[start:]`."""
        num_tokens = min(len(edge_key), len(key) - start)
        if edge_key[:num_tokens] == key[start : start + num_tokens]:  # common case, one C compare
            return num_tokens // self.page_size
        ps = self.page_size
        for page in range(num_tokens // ps):
            if (
                edge_key[page * ps : (page + 1) * ps]
                != key[start + page * ps : start + (page + 1) * ps]
            ):
                return page
        return num_tokens // ps

    def _split(self, child: Node, num_pages: int) -> Node:
        """Cut `child`'s edge after `num_pages` pages; returns the new upper node. `child` keeps its
        identity as the lower part, so locks held on it stay valid."""
        assert child.parent is not None and 0 < num_pages < len(child.page_ids)
        num_tokens = num_pages * self.page_size
        upper = Node(
            child.key[:num_tokens], child.page_ids[:num_pages], child.parent, next(self._node_ids)
        )
        upper.ref_count = child.ref_count  # every lock below child is below upper too
        upper.last_access = child.last_access
        child.key = child.key[num_tokens:]
        child.page_ids = child.page_ids[num_pages:]
        upper.parent.children[upper.key[: self.page_size]] = upper
        upper.children[child.key[: self.page_size]] = child
        child.parent = upper
        return upper

    def _path_to_root(self, node: Node) -> list[Node]:
        path = [node]
        while path[-1].parent is not None:
            path.append(path[-1].parent)
        if path[-1] is not self._root:
            raise ValueError(f"node {node.node_id} is not in this cache (evicted, or another's)")
        return path

    def _evictable_leaves(self) -> list[Node]:
        leaves = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.is_leaf and node.ref_count == 0:
                leaves.append(node)
            stack.extend(node.children.values())
        return leaves

    def _evict_from_leaf(self, leaf: Node, max_pages: int) -> int:
        """Free the whole unlocked `leaf`, or only its last `max_pages` pages if it has more."""
        if len(leaf.page_ids) > max_pages:
            freed = leaf.page_ids[len(leaf.page_ids) - max_pages :]
            del leaf.page_ids[len(leaf.page_ids) - max_pages :]
            leaf.key = leaf.key[: len(leaf.page_ids) * self.page_size]
        else:
            freed = leaf.page_ids
            assert leaf.parent is not None
            del leaf.parent.children[leaf.key[: self.page_size]]
            leaf.parent = None  # marks it evicted: lock() on a stale handle raises
        self.allocator.free(freed)
        self._tree_page_ids.difference_update(freed)
        self._num_evictable_pages -= len(freed)
        return len(freed)

    def _check_insert_args(self, token_ids: Sequence[int], page_ids: Sequence[int]) -> None:
        if len(token_ids) != len(page_ids) * self.page_size:
            raise ValueError(
                f"insert needs len(token_ids) == len(page_ids) * page_size, got {len(token_ids)} "
                f"tokens, {len(page_ids)} pages, page_size {self.page_size}"
            )
        if len(set(page_ids)) != len(page_ids):
            raise ValueError(f"insert got a page id twice: {list(page_ids)}")
        for page_id in page_ids:
            if not self.allocator.is_allocated(page_id):
                raise ValueError(f"insert got page {page_id}, which is not allocated")

    def _check_node(self, node: Node, seen_page_ids: set[int]) -> None:
        """Check one node and its child links; adds its pages to `seen_page_ids`."""
        ps = self.page_size
        if node is not self._root and (
            not node.page_ids or len(node.key) != len(node.page_ids) * ps
        ):
            raise RuntimeError(
                f"node {node.node_id}: {len(node.key)} tokens for {len(node.page_ids)} pages "
                f"of {ps}"
            )
        if node.ref_count < 0:
            raise RuntimeError(f"node {node.node_id}: negative ref count {node.ref_count}")
        for first_page, child in node.children.items():
            if child.parent is not node or child.key[:ps] != first_page:
                raise RuntimeError(f"node {child.node_id}: bad link from parent {node.node_id}")
        if sum(child.ref_count for child in node.children.values()) > node.ref_count:
            raise RuntimeError(f"node {node.node_id}: ref count below its children's sum")
        for page_id in node.page_ids:
            if page_id in seen_page_ids:
                raise RuntimeError(f"page {page_id} appears twice in the tree")
            if not self.allocator.is_allocated(page_id):
                raise RuntimeError(f"page {page_id} is in the tree but free in the allocator")
            seen_page_ids.add(page_id)


class NoPrefixCache:
    """`PrefixCache` with caching disabled: it never matches and never takes a page (`insert`
    leaves every page with the caller), so the scheduler runs one path with or without a prefix
    cache, and a finished request frees all of its pages itself."""

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self._root = Node((), [], None, 0)
        self.num_queried_tokens = 0
        self.num_matched_tokens = 0

    num_cached_pages = 0
    num_evictable_pages = 0
    num_locked_pages = 0
    hit_rate = 0.0

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        self.num_queried_tokens += len(token_ids)
        return MatchResult([], 0, self._root)

    def lock(self, node: Node) -> None:
        pass

    def unlock(self, node: Node) -> None:
        pass

    def insert(self, token_ids: Sequence[int], page_ids: Sequence[int]) -> InsertResult:
        """Takes none of `page_ids`: nothing was present and nothing is held now."""
        if len(token_ids) != len(page_ids) * self.page_size:
            raise ValueError(
                f"insert needs len(token_ids) == len(page_ids) * page_size, got {len(token_ids)} "
                f"tokens, {len(page_ids)} pages, page_size {self.page_size}"
            )
        return InsertResult(0, MatchResult([], 0, self._root))

    def evict(self, num_pages: int) -> int:
        return 0

    def reset(self) -> int:
        return 0

    def check_integrity(self) -> None:
        self.allocator.check_integrity()
