"""GraphFeed (worker/graph_feed.py) on CPU: a decode step fed straight into its bucket's inputs
leaves them exactly as the general path does (ModelRunner.build_forward_batch, the pending input
ids filled in, then GraphInputs.load), on fresh random batches, step after step; and a batch no
graph takes is left to the general path untouched. Replays on a real GPU: test_gpu_path.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker import graph_feed
from pdserve.worker.cuda_graph_runner import GraphInputs, padded_batch_size
from pdserve.worker.graph_feed import GraphFeed
from pdserve.worker.model_runner import ModelRunner, PageTableCache, PendingTokens
from tests.worker.test_cuda_graph_runner import cpu_batch_builder

PAGE_SIZE = 4
SIZES = [1, 2, 4, 8]
MAX_PAGES = 6
MAX_CONTEXT = MAX_PAGES * PAGE_SIZE


class _Graphs:
    """The decode CudaGraphRunner's surface a GraphFeed uses; a replay records its inputs."""

    tokens_per_row = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batch_sizes = SIZES
        self.max_pages = MAX_PAGES
        self.max_context_len = MAX_CONTEXT
        self.inputs = GraphInputs(SIZES, MAX_PAGES, MAX_CONTEXT, "cpu")
        self.lora_inputs = None
        self.replayed: list[tuple[int, bool, int]] = []

    def replay_loaded(self, bs: int, with_lora: bool, bsz: int) -> torch.Tensor:
        self.replayed.append((bs, with_lora, bsz))
        return torch.zeros(bsz, 3)


def _runner() -> SimpleNamespace:
    return cpu_batch_builder(PAGE_SIZE)


def _random_step(
    rng: random.Random, num_rows: int, max_len: int = MAX_CONTEXT
) -> tuple[ScheduledBatch, PendingTokens]:
    """A decode batch of random requests; about half have their input token still pending."""
    free_pages = list(range(1, 200))
    rng.shuffle(free_pages)
    items, row_of = [], {}
    num_pending = 0
    for i in range(num_rows):
        length = rng.randint(2, max_len)  # tokens known, the input token included
        prompt_len = rng.randint(1, length - 1)
        req = Request(rid=f"r{i}", prompt_ids=[rng.randrange(1000) for _ in range(prompt_len)],
                      sampling=SamplingParams())  # fmt: skip
        req.output_ids = [rng.randrange(1000) for _ in range(length - prompt_len)]
        pending = rng.random() < 0.5 and length < max_len
        position = length if pending else length - 1
        req.page_ids = [free_pages.pop() for _ in range(position // PAGE_SIZE + 1)]
        if pending:
            row_of[id(req)] = num_pending + rng.randint(0, 2)  # rows of a larger token array
            num_pending += 1
        items.append(BatchItem(req=req, start=position, num_tokens=1))  # type: ignore[arg-type]
    token_ids = torch.tensor([rng.randrange(1000, 2000) for _ in range(num_pending + 3)])
    return ScheduledBatch(items), PendingTokens(token_ids, row_of)


def _fed_and_expected(
    feed: GraphFeed, general: SimpleNamespace, expected: GraphInputs, batch: ScheduledBatch,
    pending: PendingTokens,
) -> tuple[int, int]:  # fmt: skip
    """Feed batch through `feed` and through the general path into `expected`; (bs, pages)."""
    logits = feed.replay(batch, pending, None)
    assert logits is not None and logits.shape[0] == len(batch.items)
    fb = ModelRunner.build_forward_batch(general, batch, pending)  # type: ignore[arg-type]
    bs = padded_batch_size(SIZES, fb.batch_size)
    expected.load(fb, bs)
    return bs, fb.page_table.shape[1]


@pytest.mark.parametrize(("seed", "views_kept"), [(0, 256), (1, 256), (2, 3)])
def test_fed_inputs_equal_the_general_paths_step_after_step(
    seed: int, views_kept: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_feed, "_MAX_KEPT_VIEWS", views_kept)  # 3: views made again
    rng = random.Random(seed)
    graphs = _Graphs()
    general = _runner()
    feed = GraphFeed(graphs, PAGE_SIZE, PageTableCache())  # type: ignore[arg-type]
    expected = GraphInputs(SIZES, MAX_PAGES, MAX_CONTEXT, "cpu")
    # Sizes that share a bucket, shrink within it (stale rows) and move between buckets.
    for num_rows in [8, 5, 7, 1, 3, 8, 6, 2, 4, 4]:
        batch, pending = _random_step(rng, num_rows)
        bs, num_pages = _fed_and_expected(feed, general, expected, batch, pending)
        got, want = graphs.inputs.buckets[bs], expected.buckets[bs]
        for name in ("input_ids", "positions", "slots", "seq_lens"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(
            graphs.inputs.page_table[:bs, :num_pages], expected.page_table[:bs, :num_pages]
        )
        assert graphs.replayed[-1] == (bs, False, num_rows)
    assert feed.num_fed == 10


def test_pending_rows_in_order_and_not() -> None:
    """Every input pending, in row order (one index_select), and a mix (index_copy_)."""
    graphs = _Graphs()
    feed = GraphFeed(graphs, PAGE_SIZE, PageTableCache())  # type: ignore[arg-type]
    reqs = []
    for i in range(3):
        req = Request(rid=f"r{i}", prompt_ids=[5, 6, 7], sampling=SamplingParams())
        req.output_ids, req.page_ids = [10 + i], [i + 1, i + 4]
        reqs.append(req)
    items = [BatchItem(req=r, start=4, num_tokens=1) for r in reqs]  # type: ignore[arg-type]
    tokens = torch.tensor([70, 71, 72, 73])
    pending = PendingTokens(tokens, {id(reqs[0]): 3, id(reqs[1]): 0, id(reqs[2]): 2})
    feed.replay(ScheduledBatch(items), pending, None)
    assert graphs.inputs.buckets[4].input_ids.tolist() == [73, 70, 72, 0]
    assert graphs.inputs.buckets[4].slots[:3].tolist() == [4 * 4, 5 * 4, 6 * 4]
    items[1] = BatchItem(req=reqs[1], start=3, num_tokens=1)  # type: ignore[arg-type]
    pending = PendingTokens(tokens, {id(reqs[0]): 1, id(reqs[2]): 3})
    feed.replay(ScheduledBatch(items), pending, None)
    assert graphs.inputs.buckets[4].input_ids.tolist() == [71, 11, 73, 0]
    assert graphs.inputs.buckets[4].positions.tolist() == [4, 3, 4, 0]


def test_a_batch_no_graph_takes_is_left_alone() -> None:
    graphs = _Graphs()
    feed = GraphFeed(graphs, PAGE_SIZE, PageTableCache())  # type: ignore[arg-type]
    calls: list[int] = []
    rng = random.Random(7)
    too_many, pending = _random_step(rng, 9)  # past the largest bucket
    pending = PendingTokens(pending.token_ids, pending.row_of, lambda: calls.append(1))
    assert feed.replay(too_many, pending, None) is None
    long_req = Request(
        rid="long", prompt_ids=list(range(MAX_CONTEXT + 1)), sampling=SamplingParams()
    )
    long_req.page_ids = list(range(1, MAX_PAGES + 2))
    too_long = ScheduledBatch([BatchItem(req=long_req, start=MAX_CONTEXT, num_tokens=1)])  # type: ignore[arg-type]
    assert feed.replay(too_long, pending, None) is None
    lora = object()  # adapters, but no LoRA graphs captured
    batch, pending2 = _random_step(rng, 2)
    assert feed.replay(batch, pending2, lora) is None  # type: ignore[arg-type]
    assert calls == [] and graphs.replayed == [] and feed.num_fed == 0
    assert all(b.seq_lens.eq(1).all() for b in graphs.inputs.buckets.values())


def test_a_pending_token_without_pending_tokens_is_an_error() -> None:
    graphs = _Graphs()
    feed = GraphFeed(graphs, PAGE_SIZE, PageTableCache())  # type: ignore[arg-type]
    batch, _ = _random_step(random.Random(3), 4, max_len=10)
    batch.items[0].start = len(batch.items[0].req.prompt_ids) + len(batch.items[0].req.output_ids)
    with pytest.raises(RuntimeError, match="not known and not pending"):
        feed.replay(batch, None, None)


def test_the_table_is_copied_only_when_a_rows_pages_change() -> None:
    """Two requests decoding step after step (a new page every PAGE_SIZE tokens, at the same
    steps): the table is copied on those steps only, the graphs' inputs equal the general path's
    at every step, and a write by someone else (GraphInputs.load) makes the next step copy it."""
    graphs = _Graphs()
    general = _runner()
    feed = GraphFeed(graphs, PAGE_SIZE, PageTableCache())  # type: ignore[arg-type]
    expected = GraphInputs(SIZES, MAX_PAGES, MAX_CONTEXT, "cpu")
    reqs = []
    for i, prompt_len in enumerate((5, 9)):  # positions 5 and 9: both cross a page at 8 and 12
        req = Request(rid=f"s{i}", prompt_ids=list(range(10, 10 + prompt_len)),
                      sampling=SamplingParams())  # fmt: skip
        req.output_ids = [50 + i]
        req.page_ids = [20 * i + p for p in range(1, prompt_len // PAGE_SIZE + 2)]
        reqs.append(req)
    copies = []
    for step in range(12):
        items = []
        for req in reqs:
            position = len(req.prompt_ids) + len(req.output_ids) - 1
            if len(req.page_ids) * PAGE_SIZE <= position:  # a new list: page_row is rebuilt
                req.page_ids = [*req.page_ids, req.page_ids[-1] + 1]
            items.append(BatchItem(req=req, start=position, num_tokens=1))  # type: ignore[arg-type]
        if step == 5:  # someone else writes the table: the next feed must copy it again
            other, _ = _random_step(random.Random(5), 2, max_len=10)
            fb = ModelRunner.build_forward_batch(_runner(), other)  # type: ignore[arg-type]
            graphs.inputs.load(fb, 2)
        before = feed.num_table_copies
        bs, num_pages = _fed_and_expected(
            feed, general, expected, ScheduledBatch(items), PendingTokens(torch.zeros(1), {})
        )
        copies.append(feed.num_table_copies - before)
        for name in ("input_ids", "positions", "slots", "seq_lens"):
            got, want = (
                getattr(graphs.inputs.buckets[bs], name),
                getattr(expected.buckets[bs], name),
            )
            assert torch.equal(got, want), (step, name)
        assert torch.equal(
            graphs.inputs.page_table[:bs, :num_pages], expected.page_table[:bs, :num_pages]
        ), step
        for i, req in enumerate(reqs):
            req.output_ids.append(60 + step + i)
    # Positions 5 / 9 at step 0: new pages at steps 3, 7 and 11; step 5 follows the load.
    assert copies == [1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1], copies
