"""Free-page accounting for one worker's KV pool: which page ids are handed out, which are free.

Pure bookkeeping (no tensors): the pool itself lives in `pdserve.worker.kv_pool`.
"""

from __future__ import annotations

from collections.abc import Iterable

RESERVED_PAGE_ID = 0  # padded page-table entries point here; never handed out


class PageAllocator:
    """Hands out KV page ids 1..num_pages-1; page 0 is reserved and never allocated.

    Every usable page is in exactly one of two states: free (on the stack of free ids) or allocated
    (owned by someone: a request, the radix cache). `alloc` and `free` are O(n) in the pages moved,
    independent of the pool size, and both are all-or-nothing.
    """

    def __init__(self, num_pages: int) -> None:
        """num_pages: size of the pool including the reserved page 0, so at least 2."""
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        # Popped from the end, so a fresh allocator hands out 1, 2, 3, ... (easy to read in logs).
        self._free_ids: list[int] = list(range(num_pages - 1, RESERVED_PAGE_ID, -1))
        self._is_free = bytearray(b"\x01") * num_pages  # [num_pages] 1 = free, 0 = allocated
        self._is_free[RESERVED_PAGE_ID] = 0

    @property
    def num_total(self) -> int:
        """Usable pages (the reserved page 0 excluded)."""
        return self._num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    def alloc(self, num_pages: int) -> list[int] | None:
        """Take `num_pages` free pages, or None (taking nothing) if fewer are free."""
        if num_pages < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {num_pages}")
        if num_pages > len(self._free_ids):
            return None
        if num_pages == 0:
            return []
        page_ids = self._free_ids[-num_pages:]
        del self._free_ids[-num_pages:]
        page_ids.reverse()
        for page_id in page_ids:
            self._is_free[page_id] = 0
        return page_ids

    def free(self, page_ids: Iterable[int]) -> None:
        """Return allocated pages. Raises ValueError, freeing nothing, if any page id is out of
        range, reserved, already free, or repeated in `page_ids`."""
        page_ids = list(page_ids)
        seen: set[int] = set()
        for page_id in page_ids:
            if not 0 < page_id < self._num_pages:
                raise ValueError(
                    f"page id {page_id} out of range: usable pages are 1..{self._num_pages - 1}"
                )
            if self._is_free[page_id] or page_id in seen:
                raise ValueError(f"double free of page {page_id}")
            seen.add(page_id)
        for page_id in page_ids:
            self._is_free[page_id] = 1
        self._free_ids.extend(page_ids)

    def is_allocated(self, page_id: int) -> bool:
        """True if `page_id` is a usable page currently owned by someone (not free, not page 0)."""
        return 0 < page_id < self._num_pages and not self._is_free[page_id]

    def check_integrity(self) -> None:
        """Raise RuntimeError if the free stack and the per-page state disagree."""
        if self._is_free[RESERVED_PAGE_ID]:
            raise RuntimeError("reserved page 0 is marked free")
        if len(set(self._free_ids)) != len(self._free_ids):
            raise RuntimeError("a page id appears twice on the free stack")
        for page_id in self._free_ids:
            if not 0 < page_id < self._num_pages or not self._is_free[page_id]:
                raise RuntimeError(f"free stack holds page {page_id}, which is not marked free")
        num_marked_free = sum(self._is_free)
        if num_marked_free != len(self._free_ids):
            raise RuntimeError(
                f"{num_marked_free} pages marked free but {len(self._free_ids)} on the free stack"
            )
