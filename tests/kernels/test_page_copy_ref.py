"""The torch page gather/scatter reference against plain per-page indexing (CPU)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.page_copy_ref import gather_pages_ref, scatter_pages_ref


def _pool(layers: int = 3, num_pages: int = 11) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn((layers, 2, num_pages, 4, 2, 8))  # [L, 2, P, page_size, Hkv, D]


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_pages_ref_stacks_the_chosen_pages_in_order(id_dtype: torch.dtype) -> None:
    pool = _pool()
    page_ids = torch.tensor([7, 0, 3, 10], dtype=id_dtype)
    staging = gather_pages_ref(pool, page_ids)
    assert staging.shape == (3, 2, 4, 4, 2, 8) and staging.is_contiguous()
    for i, page in enumerate(page_ids.tolist()):
        assert torch.equal(staging[:, :, i], pool[:, :, page])


def test_gather_pages_ref_fills_a_given_out_buffer() -> None:
    pool = _pool()
    out = torch.empty((3, 2, 2, 4, 2, 8))
    result = gather_pages_ref(pool, torch.tensor([5, 1]), out=out)
    assert result is out
    assert torch.equal(out[:, :, 0], pool[:, :, 5]) and torch.equal(out[:, :, 1], pool[:, :, 1])


def test_scatter_then_gather_round_trips_and_leaves_other_pages_alone() -> None:
    src, dst = _pool(), torch.zeros_like(_pool())
    src_ids = torch.tensor([2, 9, 4])
    dst_ids = torch.tensor([1, 6, 10])  # a transfer lands in different page ids
    scatter_pages_ref(dst, dst_ids, gather_pages_ref(src, src_ids))
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [p for p in range(dst.shape[2]) if p not in dst_ids.tolist()]
    assert dst[:, :, untouched].abs().sum() == 0


def test_scatter_into_a_layer_slice_writes_only_those_layers() -> None:
    pool = _pool(layers=4)
    before = pool.clone()
    staging = torch.ones((2, 2, 1, 4, 2, 8))
    scatter_pages_ref(pool[1:3], torch.tensor([8]), staging)
    assert torch.equal(pool[1:3, :, 8], staging[:, :, 0])
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[3], before[3])
    assert torch.equal(pool[1:3, :, :8], before[1:3, :, :8])


def test_copy_pages_ref_moves_pages_between_pools_and_nothing_else() -> None:
    from pdserve.kernels.page_copy_ref import copy_pages_ref

    src = torch.randn(3, 2, 9, 4, 2, 8, dtype=torch.float64)
    dst = torch.randn(3, 2, 12, 4, 2, 8, dtype=torch.float64)
    before = dst.clone()
    src_ids, dst_ids = torch.tensor([7, 2, 5]), torch.tensor([1, 11, 4])
    copy_pages_ref(src, src_ids, dst, dst_ids)
    for s, d in zip(src_ids.tolist(), dst_ids.tolist()):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [p for p in range(12) if p not in dst_ids.tolist()]
    assert torch.equal(dst[:, :, untouched], before[:, :, untouched])
