"""PoolCopy, the one-launch pool-to-pool page copy that cuda_ipc uses, against the torch reference:
every layer, K and V, pages in and out of order, ids packed at an offset, two pools of different
sizes. Bit-exact (it moves bytes)."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.page_copy_ref import copy_pages_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _random_pool(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes seen as `dtype` (NaN patterns included: the copy must move bits)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    elem = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * elem), generator=gen, device="cuda")
    return raw.to(torch.uint8).view(dtype)


@pytest.mark.parametrize(
    "page_shape,dtype",
    [((16, 8, 64), torch.bfloat16), ((16, 2, 128), torch.float32), ((3, 1, 5), torch.float16)],
)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_pool_copy_moves_the_pages_named_at_an_offset_and_nothing_else(
    page_shape: tuple[int, int, int], dtype: torch.dtype, id_dtype: torch.dtype
) -> None:
    from pdserve.kernels.triton_page_copy import PoolCopy

    src = _random_pool((3, 2, 37, *page_shape), dtype, 1)
    dst = _random_pool((3, 2, 50, *page_shape), dtype, 2)
    src_ids = torch.tensor([36, 0, 5, 17, 8, 9, 10], device="cuda")
    dst_ids = torch.tensor([1, 49, 22, 5, 30, 31, 0], device="cuda")
    garbage = torch.tensor([99, -7, 1234], device="cuda")  # before and after: never read
    ids = torch.cat([garbage, src_ids, dst_ids, garbage]).to(id_dtype)
    expected = dst.clone()
    copy_pages_ref(src, src_ids, expected, dst_ids)
    PoolCopy(src, dst)(ids, 3, 7)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


def test_pool_copy_of_zero_pages_launches_nothing_and_refuses_unlike_pools() -> None:
    from pdserve.kernels.triton_page_copy import PoolCopy

    src = torch.randn(2, 2, 8, 16, 2, 64, device="cuda")
    dst = src.clone()
    PoolCopy(src, dst)(torch.zeros(0, dtype=torch.int32, device="cuda"), 0, 0)
    assert torch.equal(src, dst)
    with pytest.raises(ValueError, match="differ outside the page axis"):
        PoolCopy(src, torch.zeros(2, 2, 8, 16, 4, 32, device="cuda"))
    with pytest.raises(ValueError, match="differ outside the page axis"):
        PoolCopy(src, dst.to(torch.bfloat16))


@pytest.mark.parametrize("block,num_warps", [(None, None), (1024, 4), (2048, 8)])
def test_pool_copy_is_exact_for_any_block_split_of_a_page(block, num_warps) -> None:
    from pdserve.kernels.triton_page_copy import PoolCopy

    src = _random_pool((4, 2, 20, 16, 8, 64), torch.bfloat16, 3)
    dst = _random_pool((4, 2, 24, 16, 8, 64), torch.bfloat16, 4)
    ids = torch.tensor([*range(19, 9, -1), *range(0, 20, 2)], dtype=torch.int32, device="cuda")
    expected = dst.clone()
    copy_pages_ref(src, ids[:10], expected, ids[10:])
    PoolCopy(src, dst, block=block, num_warps=num_warps)(ids, 0, 10)
    assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8))


def test_pool_copy_launched_again_with_the_same_ids_tensor_stays_exact() -> None:
    """The second call onwards may launch the compiled kernel directly (Triton 3.6)."""
    import triton

    from pdserve.kernels.triton_page_copy import PoolCopy

    src = _random_pool((2, 2, 30, 16, 8, 64), torch.bfloat16, 5)
    dst = _random_pool((2, 2, 40, 16, 8, 64), torch.bfloat16, 6)
    expected = dst.clone()
    copy = PoolCopy(src, dst)
    ids = torch.zeros(64, dtype=torch.int32, device="cuda")
    for round_, (src_pages, dst_pages) in enumerate(
        [
            ([1, 2], [3, 4]),
            ([29, 0, 7], [39, 5, 6]),
            ([8], [9]),
            (list(range(20)), list(range(20, 40))),
        ]
    ):
        ids[: 2 * len(src_pages)] = torch.tensor(src_pages + dst_pages, device="cuda")
        copy(ids, 0, len(src_pages))
        expected[:, :, dst_pages] = src[:, :, src_pages]
        assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8)), f"round {round_}"
    if triton.__version__.startswith("3.6."):
        assert copy.direct and copy._compiled  # the later rounds were launched directly


def test_copy_few_takes_up_to_four_pages_as_arguments_and_stays_exact() -> None:
    from pdserve.kernels.triton_page_copy import PoolCopy

    src = _random_pool((3, 2, 30, 16, 8, 64), torch.bfloat16, 7)
    dst = _random_pool((3, 2, 40, 16, 8, 64), torch.bfloat16, 8)
    expected = dst.clone()
    copy = PoolCopy(src, dst)
    rounds = [([1], [3]), ([29, 0], [39, 5]), ([7, 8, 9], [0, 1, 2]), ([4, 5, 6, 11], [9, 8, 7, 6])]
    for src_pages, dst_pages in rounds + rounds[::-1]:  # each kernel again, launched directly
        copy.copy_few(src_pages, dst_pages)
        expected[:, :, dst_pages] = src[:, :, src_pages]
        assert torch.equal(dst.view(torch.uint8), expected.view(torch.uint8)), src_pages
    with pytest.raises(ValueError, match="1..4"):
        copy.copy_few([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
