"""PageAllocator: page 0 reserved, all-or-nothing alloc/free, double free refused."""

from __future__ import annotations

import random

import pytest

from pdserve.scheduler.page_allocator import PageAllocator


def test_fresh_allocator_hands_out_every_page_but_zero() -> None:
    allocator = PageAllocator(8)
    assert allocator.num_total == 7
    assert allocator.num_free == 7
    page_ids = allocator.alloc(7)
    assert page_ids is not None and sorted(page_ids) == [1, 2, 3, 4, 5, 6, 7]
    assert allocator.num_free == 0
    assert allocator.alloc(1) is None
    assert not allocator.is_allocated(0)


def test_alloc_is_all_or_nothing() -> None:
    allocator = PageAllocator(5)
    assert allocator.alloc(2) == [1, 2]
    assert allocator.alloc(3) is None
    assert allocator.num_free == 2
    assert allocator.alloc(0) == []
    assert allocator.alloc(2) == [3, 4]


def test_freed_pages_are_reused() -> None:
    allocator = PageAllocator(4)
    page_ids = allocator.alloc(3)
    assert page_ids is not None
    allocator.free([page_ids[1]])
    assert allocator.num_free == 1
    assert allocator.alloc(1) == [page_ids[1]]


def test_double_free_raises_and_frees_nothing() -> None:
    allocator = PageAllocator(6)
    page_ids = allocator.alloc(3)
    assert page_ids is not None
    allocator.free([page_ids[0]])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([page_ids[1], page_ids[0]])
    assert allocator.is_allocated(page_ids[1])  # the valid page in the refused call stays taken
    with pytest.raises(ValueError, match="double free"):
        allocator.free([page_ids[2], page_ids[2]])
    assert allocator.is_allocated(page_ids[2])
    allocator.check_integrity()


@pytest.mark.parametrize("page_id", [0, -1, 6, 100])
def test_free_out_of_range_or_reserved_raises(page_id: int) -> None:
    allocator = PageAllocator(6)
    allocator.alloc(5)
    with pytest.raises(ValueError, match="out of range"):
        allocator.free([page_id])
    assert allocator.num_free == 0


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(1)
    with pytest.raises(ValueError, match="negative"):
        PageAllocator(4).alloc(-1)


def test_random_alloc_free_matches_a_set_model() -> None:
    for seed in range(5):
        rng = random.Random(seed)
        allocator = PageAllocator(33)
        held: set[int] = set()
        for _ in range(300):
            if rng.random() < 0.5:
                num_pages = rng.randint(0, 10)
                page_ids = allocator.alloc(num_pages)
                if num_pages > 32 - len(held):
                    assert page_ids is None
                    continue
                assert page_ids is not None and len(page_ids) == num_pages
                assert not held & set(page_ids) and 0 not in page_ids
                held.update(page_ids)
            elif held:
                to_free = rng.sample(sorted(held), rng.randint(1, len(held)))
                allocator.free(to_free)
                held.difference_update(to_free)
            assert allocator.num_free == 32 - len(held)
            assert all(allocator.is_allocated(p) for p in held)
            allocator.check_integrity()


def test_check_integrity_detects_a_corrupt_free_stack() -> None:
    allocator = PageAllocator(4)
    allocator.alloc(1)
    allocator._free_ids.append(allocator._free_ids[0])  # corrupt on purpose
    with pytest.raises(RuntimeError, match="twice"):
        allocator.check_integrity()
