"""Each Triton kernel against its torch reference, on random inputs of awkward sizes.

Needs CUDA and triton; also runs (slowly) on CPU under Triton's interpreter, TRITON_INTERPRET=1.
Errors are measured as max |out - ref| / max |ref|: at most 1e-2 for bf16/fp16, 1e-4 for fp32.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from pdserve.config.engine_config import RopeScaling
from pdserve.kernels.activation_ref import silu_and_mul_ref
from pdserve.kernels.attention_ref import decode_attention_ref, extend_attention_ref
from pdserve.kernels.norm_ref import fused_add_rms_norm_ref, rms_norm_ref
from pdserve.kernels.page_copy_ref import gather_pages_ref, scatter_pages_ref
from pdserve.kernels.rotary_ref import apply_rotary_ref, rope_cos_sin_cache

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _HAS_TRITON or not (torch.cuda.is_available() or _INTERPRET),
        reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
    ),
]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_REL_TOL = {BF16: 1e-2, FP16: 1e-2, FP32: 1e-4}


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The fp32 references must not run on TF32 tensor cores."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out.float()).all(), "non-finite values in the kernel's output"
    err = (out.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-6)
    assert err <= _REL_TOL[dtype] * scale, f"max abs err {err:.3e}, max |ref| {scale:.3e}"


def make_paged_kv(
    seq_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches ([num_pages, page_size, Hkv, D]) with every sequence's pages scattered."""
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + 7  # spare pages hold garbage the kernel must not read
    perm = torch.randperm(num_pages)
    page_table = torch.zeros((len(seq_lens), max(pages_per_seq) + 3), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = perm[used : used + n]
        used += n
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    return k_cache, v_cache, page_table.to(DEVICE)


def random_lens(batch: int, low: int, high: int, page_size: int) -> list[int]:
    lens = torch.randint(low, high + 1, (batch,)).tolist()
    edges = [high, low, page_size, page_size + 1]  # boundary lengths first, as batch allows
    return [min(max(e, low), high) for e in edges[: min(batch, 4)]] + lens[4:]


# ---- decode ----------------------------------------------------------------------------------

DECODE_CASES = [
    # batch, Hq, Hkv, D, page_size, dtype, num_splits, max_len
    (1, 8, 8, 64, 16, BF16, None, 300),  # group 1
    (37, 32, 8, 128, 16, BF16, None, 600),  # group 4
    (37, 32, 4, 64, 16, BF16, 7, 600),  # group 8, odd split count
    (37, 16, 2, 128, 16, FP32, None, 300),
    (5, 32, 8, 64, 16, FP16, 1, 300),  # one split: no merge kernel
    (9, 28, 4, 128, 1, BF16, 3, 200),  # group 7, one token per page
    (2, 32, 8, 128, 16, BF16, 16, 3000),  # long context, many splits
    (5, 8, 2, 80, 16, FP16, 3, 200),  # head_dim not a power of two
]


@pytest.mark.parametrize("batch,hq,hkv,dim,page_size,dtype,num_splits,max_len", DECODE_CASES)
def test_decode_attention_matches_reference(
    batch: int,
    hq: int,
    hkv: int,
    dim: int,
    page_size: int,
    dtype: torch.dtype,
    num_splits: int | None,
    max_len: int,
) -> None:
    from pdserve.kernels.triton_decode_attention import DecodeConfig, decode_attention

    lens = random_lens(batch, 1, max_len, page_size)
    k_cache, v_cache, page_table = make_paged_kv(lens, page_size, hkv, dim, dtype)
    q = torch.randn((batch, hq, dim), dtype=dtype, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    out = decode_attention(
        q, k_cache, v_cache, page_table, seq_lens, scale, config=DecodeConfig(num_splits=num_splits)
    )
    ref = decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, scale)
    assert_rel_close(out, ref, dtype)


FUSED_DECODE_CASES = [
    # batch, Hq, Hkv, D, rotary_dim, dtype, num_splits, max_len
    (5, 32, 8, 64, 64, BF16, None, 300),  # Llama-1B's heads, the launcher's split count
    (9, 32, 8, 128, 128, BF16, 1, 200),  # one split: the new token in the only program
    (7, 16, 4, 64, 64, FP32, 4, 150),  # new tokens in the last split, or alone in it
    (6, 8, 2, 64, 32, FP32, 3, 100),  # partial rotary: the tail of q and k as it is
    (4, 28, 4, 80, 80, FP16, 2, 90),  # head_dim not a power of two
]


@pytest.mark.parametrize("batch,hq,hkv,dim,rot,dtype,num_splits,max_len", FUSED_DECODE_CASES)
def test_decode_with_the_new_token_equals_rotary_store_then_decode(
    batch: int,
    hq: int,
    hkv: int,
    dim: int,
    rot: int,
    dtype: torch.dtype,
    num_splits: int | None,
    max_len: int,
) -> None:
    from pdserve.kernels.attention_ref import NewToken, decode_with_new_token_ref
    from pdserve.kernels.triton_decode_attention import DecodeConfig, decode_attention

    page_size = 16
    lens = random_lens(batch, 2, max_len, page_size)
    k_cache, v_cache, page_table = make_paged_kv(lens, page_size, hkv, dim, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    last = seq_lens.long() - 1  # the new token's position, and its slot in its page
    slots = page_table.long()[torch.arange(batch, device=DEVICE), last // page_size] * page_size
    slots = slots + last % page_size
    cos_sin = rope_cos_sin_cache(rot, 4096, 500000.0, RopeScaling(), DEVICE)
    # q, k, v as views of one fused qkv projection, as the model hands them over
    qkv = torch.randn((batch, (hq + 2 * hkv) * dim), dtype=dtype, device=DEVICE)
    q = qkv[:, : hq * dim].view(batch, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(batch, hkv, dim)
    v = qkv[:, (hq + hkv) * dim :].view(batch, hkv, dim)
    new = NewToken(k, v, last, slots, cos_sin)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = decode_with_new_token_ref(q, ref_k, ref_v, page_table, seq_lens, dim**-0.5, new)
    q_before = q.clone()
    out = decode_attention(
        q, k_cache, v_cache, page_table, seq_lens, dim**-0.5,
        config=DecodeConfig(num_splits=num_splits), new_token=new,
    )  # fmt: skip
    assert_rel_close(out, ref, dtype)
    assert torch.equal(q, q_before), "q must not be modified"
    # The new k and v at their slots (rounded as the reference's store rounds), nothing else. The
    # kernel's rotary may fuse multiply and add where torch rounds twice: a few ulps in float32.
    tol = 1e-5 if dtype == FP32 else 1e-2
    torch.testing.assert_close(k_cache.float(), ref_k.float(), atol=tol, rtol=tol)
    assert torch.equal(v_cache, ref_v)


def test_decode_attention_reads_a_layer_view_of_the_pool() -> None:
    from pdserve.kernels.triton_decode_attention import decode_attention

    lens = [33, 1, 70]
    k_cache, v_cache, page_table = make_paged_kv(lens, 16, 2, 64, BF16)
    pool = torch.stack([torch.stack([k_cache, v_cache])] * 2)  # [L=2, 2, P, page, Hkv, D]
    pool[0].zero_()
    qkv = torch.randn((3, 8 * 64 + 2 * 2 * 64), dtype=BF16, device=DEVICE)
    q = qkv[:, : 8 * 64].view(3, 8, 64)  # a strided view, as after the fused projection
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, pool[1, 0], pool[1, 1], page_table, seq_lens, 0.125)
    ref = decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, 0.125)
    assert_rel_close(out, ref, BF16)


def test_decode_attention_rejects_mismatched_inputs() -> None:
    from pdserve.kernels.triton_decode_attention import decode_attention

    k_cache, v_cache, page_table = make_paged_kv([5], 16, 2, 64, BF16)
    seq_lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    q = torch.randn((1, 6, 64), dtype=BF16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(q[:, :3], k_cache, v_cache, page_table, seq_lens, 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        decode_attention(q.float(), k_cache, v_cache, page_table, seq_lens, 1.0)
    with pytest.raises(ValueError, match="page_table"):
        decode_attention(q, k_cache, v_cache, page_table.long(), seq_lens, 1.0)


# ---- extend ----------------------------------------------------------------------------------

EXTEND_CASES = [
    # batch, Hq, Hkv, D, page_size, dtype, max_prefix, max_extend
    (1, 8, 8, 64, 16, BF16, 0, 200),  # plain prefill, group 1
    (37, 32, 8, 128, 16, BF16, 300, 150),  # group 4
    (37, 16, 2, 64, 16, FP32, 100, 70),  # group 8
    (6, 16, 4, 128, 16, FP16, 500, 300),
    (5, 8, 1, 64, 1, BF16, 40, 33),  # one token per page
    (3, 8, 2, 96, 16, FP16, 100, 80),  # head_dim not a power of two
]


@pytest.mark.parametrize("batch,hq,hkv,dim,page_size,dtype,max_prefix,max_extend", EXTEND_CASES)
def test_extend_attention_matches_reference(
    batch: int,
    hq: int,
    hkv: int,
    dim: int,
    page_size: int,
    dtype: torch.dtype,
    max_prefix: int,
    max_extend: int,
) -> None:
    from pdserve.kernels.triton_extend_attention import extend_attention

    extend_lens = random_lens(batch, 1, max_extend, page_size)
    prefix_lens = torch.randint(0, max_prefix + 1, (batch,)).tolist()
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    k_cache, v_cache, page_table = make_paged_kv(seq_lens, page_size, hkv, dim, dtype)
    q = torch.randn((sum(extend_lens), hq, dim), dtype=dtype, device=DEVICE)
    starts = [0] + torch.tensor(extend_lens).cumsum(0).tolist()[:-1]
    as_dev = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    scale = dim**-0.5
    out = extend_attention(
        q,
        k_cache,
        v_cache,
        page_table,
        as_dev(seq_lens),
        as_dev(extend_lens),
        as_dev(starts),
        max(extend_lens),
        scale,
    )
    ref = extend_attention_ref(q, k_cache, v_cache, page_table, seq_lens, extend_lens, scale)
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (64, 16), (128, 128)])
def test_extend_attention_is_correct_for_any_launch_config(block_m: int, block_n: int) -> None:
    from pdserve.kernels.triton_extend_attention import ExtendConfig, extend_attention

    extend_lens, seq_lens = [70, 1, 129], [70, 200, 300]
    k_cache, v_cache, page_table = make_paged_kv(seq_lens, 16, 2, 64, FP16)
    q = torch.randn((sum(extend_lens), 8, 64), dtype=FP16, device=DEVICE)
    as_dev = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out = extend_attention(
        q,
        k_cache,
        v_cache,
        page_table,
        as_dev(seq_lens),
        as_dev(extend_lens),
        as_dev([0, 70, 71]),
        129,
        0.125,
        config=ExtendConfig(block_m, block_n, num_warps=4, num_stages=2),
    )
    ref = extend_attention_ref(q, k_cache, v_cache, page_table, seq_lens, extend_lens, 0.125)
    assert_rel_close(out, ref, FP16)


# ---- norm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 4096), (37, 5120), (100, 1000)])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_rms_norm_matches_reference(rows: int, cols: int, dtype: torch.dtype) -> None:
    from pdserve.kernels.triton_norm import rms_norm

    x = torch.randn((rows, cols), dtype=dtype, device=DEVICE) * 3
    weight = torch.rand(cols, dtype=dtype, device=DEVICE) + 0.5
    assert_rel_close(rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6), dtype)


def test_rms_norm_keeps_reference_dtype_for_float32_weight() -> None:
    from pdserve.kernels.triton_norm import rms_norm

    x = torch.randn((3, 5, 128), dtype=BF16, device=DEVICE)
    weight = torch.rand(128, dtype=FP32, device=DEVICE)
    out, ref = rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5)
    assert out.dtype == ref.dtype == FP32
    assert_rel_close(out, ref, BF16)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, inplace: bool) -> None:
    from pdserve.kernels.triton_norm import fused_add_rms_norm

    x = torch.randn((37, 3000), dtype=dtype, device=DEVICE)
    residual = torch.randn((37, 3000), dtype=dtype, device=DEVICE) * 4
    weight = torch.rand(3000, dtype=dtype, device=DEVICE) + 0.5
    ref_normed, ref_sum = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-6, inplace=inplace)
    assert torch.equal(summed, ref_sum), "the residual sum must round exactly like x + residual"
    assert_rel_close(normed, ref_normed, dtype)
    if inplace:
        assert normed.data_ptr() == x.data_ptr() and summed.data_ptr() == residual.data_ptr()


# ---- rotary ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_rotary_matches_reference_on_fused_qkv_views(dim: int, dtype: torch.dtype) -> None:
    from pdserve.kernels.triton_rotary import apply_rotary_

    num_tokens, hq, hkv = 37, 32, 8
    cache = rope_cos_sin_cache(dim, 5000, 500000.0, RopeScaling(), DEVICE)
    positions = torch.randint(0, 5000, (num_tokens,), device=DEVICE)
    qkv = torch.randn((num_tokens, (hq + 2 * hkv) * dim), dtype=dtype, device=DEVICE)
    q = qkv[:, : hq * dim].view(num_tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hkv) * dim].view(num_tokens, hkv, dim)
    v_before = qkv[:, (hq + hkv) * dim :].clone()
    ref_q, ref_k = apply_rotary_ref(q, k, positions, cache)
    apply_rotary_(q, k, positions, cache)
    assert_rel_close(q, ref_q, dtype)
    assert_rel_close(k, ref_k, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * dim :], v_before), "rotary wrote outside q and k"


def test_partial_rotary_leaves_the_tail_untouched() -> None:
    from pdserve.kernels.triton_rotary import apply_rotary_

    cache = rope_cos_sin_cache(32, 100, 10000.0, RopeScaling(), DEVICE)  # rotary_dim 32 of D=64
    positions = torch.arange(5, device=DEVICE, dtype=torch.int32) * 7
    q = torch.randn((5, 4, 64), dtype=FP32, device=DEVICE)
    k = torch.randn((5, 2, 64), dtype=FP32, device=DEVICE)
    ref_q, ref_k = apply_rotary_ref(q[..., :32], k[..., :32], positions.long(), cache)
    q0, k0 = q.clone(), k.clone()
    apply_rotary_(q, k, positions, cache)
    assert_rel_close(q[..., :32], ref_q, FP32)
    assert_rel_close(k[..., :32], ref_k, FP32)
    assert torch.equal(q[..., 32:], q0[..., 32:]) and torch.equal(k[..., 32:], k0[..., 32:])


# ---- activation ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2 * 11008), (37, 2 * 1000), (5, 26), (2, 3, 128)])
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_silu_and_mul_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from pdserve.kernels.triton_activation import silu_and_mul

    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    assert_rel_close(silu_and_mul(x), silu_and_mul_ref(x), dtype)


# ---- page copy -------------------------------------------------------------------------------

PAGE_COPY_CASES = [
    # layers, num_pages, page shape (page_size, Hkv, D), dtype
    (3, 37, (16, 2, 64), BF16),
    (2, 11, (16, 8, 128), FP32),
    (2, 9, (3, 1, 5), torch.uint8),  # 15-byte pages: copied byte by byte
    (1, 5, (1, 1, 3), FP16),  # 6-byte pages: 16-bit words
]


@pytest.mark.parametrize("layers,num_pages,page_shape,dtype", PAGE_COPY_CASES)
def test_page_gather_and_scatter_match_reference(
    layers: int, num_pages: int, page_shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    from pdserve.kernels.triton_page_copy import gather_pages, scatter_pages

    shape = (layers, 2, num_pages, *page_shape)
    pool = torch.randint(0, 100, shape, device=DEVICE).to(dtype)
    page_ids = torch.randperm(num_pages, device=DEVICE)[: num_pages // 2 + 1].int()
    staging = gather_pages(pool, page_ids)
    assert torch.equal(staging, gather_pages_ref(pool, page_ids))

    new = torch.randint(0, 100, staging.shape, device=DEVICE).to(dtype)
    expected = pool.clone()
    scatter_pages_ref(expected, page_ids, new)
    scatter_pages(pool, page_ids, new)
    assert torch.equal(pool, expected)


def test_page_copy_on_a_layer_slice_touches_only_those_layers() -> None:
    from pdserve.kernels.triton_page_copy import gather_pages, scatter_pages

    pool = torch.randn((4, 2, 13, 16, 2, 64), dtype=BF16, device=DEVICE)
    page_ids = torch.tensor([12, 0, 5], dtype=torch.int64, device=DEVICE)
    staging = torch.randn((2, 2, 3, 16, 2, 64), dtype=BF16, device=DEVICE)
    expected = pool.clone()
    expected[1:3, :, page_ids] = staging
    scatter_pages(pool[1:3], page_ids, staging)
    assert torch.equal(pool, expected)
    assert torch.equal(gather_pages(pool[1:3], page_ids), staging)


def test_page_copy_rejects_a_staging_buffer_of_the_wrong_shape() -> None:
    from pdserve.kernels.triton_page_copy import scatter_pages

    pool = torch.zeros((2, 2, 8, 16, 2, 64), dtype=BF16, device=DEVICE)
    page_ids = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="staging must be"):
        scatter_pages(pool, page_ids, torch.zeros((2, 2, 3, 16, 2, 64), dtype=BF16, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pool_to_pool_copy_matches_reference(dtype: torch.dtype) -> None:
    from pdserve.kernels.page_copy_ref import copy_pages_ref
    from pdserve.kernels.triton_page_copy import copy_pages

    src = torch.randn(5, 2, 33, 16, 8, 64, device="cuda").to(dtype)
    dst = torch.randn(5, 2, 40, 16, 8, 64, device="cuda").to(dtype)
    expected = dst.clone()
    src_ids = torch.tensor([3, 31, 0, 17, 8], device="cuda")
    dst_ids = torch.tensor([39, 1, 22, 5, 30], device="cuda", dtype=torch.int32)
    copy_pages_ref(src, src_ids, expected, dst_ids)
    copy_pages(src, src_ids, dst, dst_ids)
    assert torch.equal(dst, expected)
