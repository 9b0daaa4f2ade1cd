"""The packed batch's page table across steps (model_runner.PageTableCache, page_row): whatever the
scheduler does to the requests' pages between steps (new pages, pages given back, a prefix's pages
swapped for the cache's, requests joining, leaving or reordered), every step's table equals one
built from the page lists alone."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.worker.model_runner import PageTableCache, page_row


def reference(page_lists: list[list[int]]) -> np.ndarray:
    width = max(len(p) for p in page_lists)
    table = np.zeros((len(page_lists), width), dtype=np.int32)
    for r, pages in enumerate(page_lists):
        table[r, : len(pages)] = pages
    return table


def build(cache: PageTableCache, reqs: list[Request]) -> np.ndarray:
    rows = [page_row(req) for req in reqs]
    counts = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.full((len(reqs), int(counts.max())), -1, dtype=np.int32)  # stale bytes in the buffer
    cache.fill(out, rows, counts)
    return out


CHANGES = st.sampled_from(["grow", "trim", "swap_prefix", "replace", "none", "none", "none"])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    steps=st.lists(
        st.tuples(
            st.lists(CHANGES, min_size=1, max_size=8),
            st.sampled_from(["keep", "drop", "add", "shuffle"]),
        ),  # fmt: skip
        min_size=1,
        max_size=12,
    ),
)
def test_every_step_table_equals_one_built_from_the_lists(seed: int, steps: list) -> None:
    rng = np.random.default_rng(seed)
    next_page = iter(range(1, 1_000_000))

    def new_request(i: int) -> Request:
        req = Request(rid=f"r{i}", prompt_ids=[1], sampling=SamplingParams())
        req.page_ids = [next(next_page) for _ in range(int(rng.integers(1, 6)))]
        return req

    reqs = [new_request(i) for i in range(4)]
    cache = PageTableCache()
    for changes, membership in steps:
        for change, req in zip(changes, reqs, strict=False):
            if change == "grow":  # the scheduler's _ensure_pages
                req.page_ids = req.page_ids + [next(next_page)]
            elif change == "trim" and len(req.page_ids) > 1:  # trim_pages
                req.page_ids = req.page_ids[:-1]
            elif change == "swap_prefix":  # _share_full_pages: same length, other first pages
                req.page_ids = [next(next_page)] + req.page_ids[1:]
            elif change == "replace":  # preempted and admitted again
                req.page_ids = [next(next_page) for _ in range(len(req.page_ids))]
        if membership == "drop" and len(reqs) > 1:
            reqs.pop(int(rng.integers(len(reqs))))
        elif membership == "add":
            reqs.insert(int(rng.integers(len(reqs) + 1)), new_request(len(reqs) + 100))
        elif membership == "shuffle":
            reqs = [reqs[i] for i in rng.permutation(len(reqs))]
        got = build(cache, reqs)
        np.testing.assert_array_equal(got, reference([r.page_ids for r in reqs]))


def test_a_row_is_copied_once_per_list() -> None:
    req = Request(rid="r", prompt_ids=[1], sampling=SamplingParams())
    req.page_ids = [3, 4]
    first = page_row(req)
    assert page_row(req) is first  # the same list: the same row
    req.page_ids = req.page_ids + [9]
    second = page_row(req)
    assert second is not first and second.tolist() == [3, 4, 9]
