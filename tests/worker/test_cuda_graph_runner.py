"""The CUDA graph runner's host-side logic on CPU: which batch sizes are captured, which graph a
batch is padded to, that the static inputs hold padding values in every row past the batch, and how
the batches it is fed are packed. Capture and replay themselves are in test_gpu_path.py (gpu)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.config.sampling_params import SamplingParams
from pdserve.kernels.attention import get_attention_backend
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch
from pdserve.worker.cuda_graph_runner import (
    BATCH_SIZE_BUCKETS,
    CudaGraphRunner,
    GraphInputs,
    capture_batch_sizes,
    num_table_pages,
    padded_batch_size,
)
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.model_runner import ModelRunner, PageTableCache
from pdserve.worker.parallel.tp_group import SINGLE


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (100, [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]),
        (256, list(BATCH_SIZE_BUCKETS)),
        (300, [*BATCH_SIZE_BUCKETS, 300]),
        (500, [*BATCH_SIZE_BUCKETS, 320, 384, 448, 500]),
    ],
)
def test_capture_sizes_are_the_buckets_up_to_max_batch(max_batch: int, expected: list[int]) -> None:
    assert capture_batch_sizes(max_batch) == expected


def test_capture_sizes_reject_a_batch_below_one() -> None:
    with pytest.raises(ValueError, match="cuda_graph_max_batch must be >= 1, got 0"):
        capture_batch_sizes(0)


def test_a_batch_pads_to_the_smallest_captured_size_that_holds_it() -> None:
    sizes = capture_batch_sizes(256)
    assert [padded_batch_size(sizes, b) for b in (1, 2, 3, 5, 17, 64, 65, 255, 256)] == [
        1,
        2,
        4,
        8,
        24,
        64,
        96,
        256,
        256,
    ]
    assert padded_batch_size(sizes, 257) is None
    for bs in sizes:
        assert padded_batch_size(sizes, bs) == bs


def test_page_table_width_covers_the_longest_context() -> None:
    assert num_table_pages(2048, 16) == 128
    assert num_table_pages(2049, 16) == 129
    assert num_table_pages(1, 16) == 1


def _decode_batch(seq_lens: list[int], tables: list[list[int]], page_size: int) -> ForwardBatch:
    bsz = len(seq_lens)
    table = torch.zeros(bsz, max(map(len, tables)), dtype=torch.int32)
    for b, pages in enumerate(tables):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    positions = [n - 1 for n in seq_lens]
    slots = [t[p // page_size] * page_size + p % page_size for t, p in zip(tables, positions)]
    return ForwardBatch(
        input_ids=torch.arange(100, 100 + bsz),
        positions=torch.tensor(positions),
        slots=torch.tensor(slots),
        page_table=table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=[1] * bsz,
        logit_idx=torch.arange(bsz),
        is_decode=True,
    )


def _assert_padding_rows(inputs: GraphInputs, bs: int, start: int, num_pages: int) -> None:
    bucket = inputs.buckets[bs]
    assert bucket.input_ids[start:].eq(0).all()
    assert bucket.positions[start:].eq(0).all()
    assert bucket.slots[start:].eq(0).all()  # page 0, never handed out
    assert bucket.seq_lens[start:].eq(1).all()
    assert inputs.page_table[start:bs, :num_pages].eq(0).all()


def test_rows_past_a_smaller_batch_are_reset_to_padding() -> None:
    inputs = GraphInputs([4, 8], max_pages=4, max_context_len=64, device="cpu")
    big = _decode_batch([5, 20, 33, 9, 40], [[3], [4, 7], [1, 2, 5], [6], [8, 9, 11]], 16)
    inputs.load(big, 8)
    view = inputs.batch(8)
    assert view.is_decode and view.max_seq_len == 64 and view.max_extend_len == 1
    assert torch.equal(view.seq_lens[:5], big.seq_lens)
    assert torch.equal(view.slots[:5], big.slots)
    assert torch.equal(view.page_table[:5, :3], big.page_table)
    _assert_padding_rows(inputs, 8, 5, 3)

    small = _decode_batch([17], [[9, 10]], page_size=16)
    inputs.load(small, 8)
    bucket = inputs.buckets[8]
    assert bucket.input_ids[0] == 100 and bucket.seq_lens[0] == 17 and bucket.slots[0] == 160
    assert inputs.page_table[0, :2].tolist() == [9, 10]
    _assert_padding_rows(inputs, 8, 1, 2)
    with pytest.raises(ValueError, match="does not fit the graph of 4"):
        inputs.load(big, 4)


def test_graph_view_of_the_inputs_shares_their_memory() -> None:
    inputs = GraphInputs([2, 4], max_pages=2, max_context_len=32, device="cpu")
    view = inputs.batch(2)
    inputs.load(_decode_batch([3, 4], [[1], [2]], page_size=16), 2)
    assert view.seq_lens.tolist() == [3, 4]
    assert view.logit_idx.tolist() == [0, 1]
    assert view.extend_starts.tolist() == [0, 1]
    assert inputs.buckets[4].seq_lens.tolist() == [1, 1, 1, 1]  # another bucket: untouched


def test_each_bucket_is_one_aligned_block() -> None:
    inputs = GraphInputs([3, 8], max_pages=2, max_context_len=32, device="cpu", tokens_per_row=2)
    for bs, bucket in inputs.buckets.items():
        views = [bucket.input_ids, bucket.positions, bucket.slots, bucket.seq_lens]
        views += [bucket.fill_dst, bucket.fill_src]
        assert {v.untyped_storage().data_ptr() for v in views} == {bucket.block.data_ptr()}
        assert all(v.data_ptr() % 16 == 0 for v in views)
        assert [v.numel() for v in views] == [2 * bs, 2 * bs, 2 * bs, bs, 2 * bs, 2 * bs]
        assert bucket.seq_lens.eq(2).all() and bucket.input_ids.eq(0).all()


def test_runner_stays_off_for_a_backend_that_cannot_be_captured() -> None:
    model_runner = SimpleNamespace(
        config=SimpleNamespace(
            cuda_graph_max_batch=16,
            scheduler=SimpleNamespace(max_context_len=None, max_running_requests=256),
        ),
        model=SimpleNamespace(attention=get_attention_backend("torch")),
        kv_pool=None,
        device=torch.device("cpu"),
        model_config=SimpleNamespace(context_limit=lambda requested: requested or 128),
        page_size=16,
        draw_graphs=None,
    )
    runner = CudaGraphRunner(model_runner)  # type: ignore[arg-type]
    assert runner.batch_sizes == []
    assert runner.max_pages == 8
    assert not runner.can_run(_decode_batch([3], [[1]], page_size=16))


# --- the batches the runner is fed: ModelRunner.build_forward_batch's one packed buffer ----------


def cpu_batch_builder(page_size: int) -> SimpleNamespace:
    """What ModelRunner.build_forward_batch reads of its runner, on CPU."""
    runner = SimpleNamespace(
        page_size=page_size,
        device=torch.device("cpu"),
        _staging=[None, None],
        _staging_turn=0,
        tp=SINGLE,
        _page_tables=PageTableCache(),
    )
    runner._host_buffer = lambda n: ModelRunner._host_buffer(runner, n)  # type: ignore[arg-type]
    runner._device_batch = lambda *a: ModelRunner._device_batch(runner, *a)  # type: ignore[arg-type]
    return runner


def test_forward_batch_is_packed_into_one_aligned_buffer() -> None:
    def item(
        prompt: list[int], output: list[int], pages: list[int], start: int, num: int
    ) -> BatchItem:
        req = Request(rid=str(prompt), prompt_ids=prompt, sampling=SamplingParams())
        req.output_ids, req.page_ids = output, pages
        return BatchItem(req=req, start=start, num_tokens=num)  # type: ignore[arg-type]

    batch = ScheduledBatch(
        [
            item(list(range(10, 17)), [], [5, 9], start=2, num=4),  # a prefill chunk over a prefix
            item([1, 2, 3], [7, 8], [3, 6], start=4, num=1),  # a decode
            item([4], [], [2], start=0, num=1),  # a one-token prompt
        ]
    )
    fb = ModelRunner.build_forward_batch(cpu_batch_builder(4), batch)  # type: ignore[arg-type]
    assert fb.input_ids.tolist() == [12, 13, 14, 15, 8, 4]
    assert fb.positions.tolist() == [2, 3, 4, 5, 4, 0]
    assert fb.slots.tolist() == [22, 23, 36, 37, 24, 8]
    assert fb.page_table.tolist() == [[5, 9], [3, 6], [2, 0]]
    assert fb.seq_lens.tolist() == fb.seq_lens_cpu == [6, 5, 1]
    assert fb.extend_lens.tolist() == fb.extend_lens_cpu == [4, 1, 1]
    assert fb.extend_starts.tolist() == [0, 4, 5]
    assert fb.logit_idx.tolist() == [3, 4, 5]
    assert (fb.is_decode, fb.max_extend_len, fb.max_seq_len) == (False, 4, 6)
    tensors = [fb.input_ids, fb.positions, fb.slots, fb.logit_idx, fb.seq_lens, fb.page_table]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one buffer, one copy
    assert all(t.data_ptr() % 16 == 0 for t in [*tensors, fb.extend_lens, fb.extend_starts])
