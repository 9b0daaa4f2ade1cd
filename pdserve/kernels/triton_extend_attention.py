"""Triton prefill/extend attention over a paged KV cache with a cached prefix and a causal mask.

A ragged batch: sequence b adds extend_lens[b] new tokens (rows extend_starts[b].. of q) after a
cached prefix of seq_lens[b] - extend_lens[b] tokens. The new tokens' K and V are already in the
cache, so every key is read through the page table. One program owns BLOCK_M new tokens of one
sequence and one query head. The torch reference is `attention_ref.extend_attention_ref`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import cdiv, next_power_of_2
from pdserve.kernels.triton_paged_rows import load_rows

_LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class ExtendConfig(NamedTuple):
    block_m: int  # query tokens per program
    block_n: int  # KV tokens per inner step
    num_warps: int
    num_stages: int


def default_extend_config(head_dim: int, dtype: torch.dtype) -> ExtendConfig:
    """The fastest of a sweep on an H100 in bf16 (benchmarks/kernels/bench_kernels.py --sweep)."""
    if dtype == torch.float32:
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return ExtendConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


@triton.jit
def _extend_step(
    q,
    acc,
    m_i,
    l_i,
    k_pos,
    q_pos,
    end,
    page_row,
    k_base,
    v_base,
    stride_kp,
    stride_ks,
    stride_vp,
    stride_vs,
    scale_log2e,
    offs_d,
    mask_d,
    PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys k_pos ([BLOCK_N]); CAUSAL adds the diagonal's mask."""
    mask_n = k_pos < end
    if CAUSAL:
        page = tl.load(page_row + k_pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(page_row + k_pos // PAGE_SIZE).to(tl.int64)
    in_page = k_pos % PAGE_SIZE
    k = load_rows(
        k_base, page * stride_kp + in_page * stride_ks, offs_d, mask_n, mask_d, CAUSAL, EVEN_D
    )  # [BLOCK_N, BLOCK_D]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [M, N]
    if CAUSAL:
        visible = (k_pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(
        v_base, page * stride_vp + in_page * stride_vs, offs_d, mask_n, mask_d, CAUSAL, EVEN_D
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["first_seq", "stride_ptb"])  # the page table's width varies
def _extend_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,  # [num_pages, page_size, Hkv, D]
    out_ptr,  # [T, Hq, D]
    page_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    extend_lens_ptr,  # [B] int32
    extend_starts_ptr,  # [B] int32: first row of sequence b in q
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_ptb,
    first_seq,  # the grid's sequence 0 is this one of the batch (earlier ones are done elsewhere)
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2) + first_seq

    extend_len = tl.load(extend_lens_ptr + b)
    m0 = m_block * BLOCK_M
    if m0 >= extend_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix_len = seq_len - extend_len
    row0 = tl.load(extend_starts_ptr + b).to(tl.int64)
    kv_head = head // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] index among the new tokens
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < extend_len
    mask_d = offs_d < HEAD_DIM
    q_pos = prefix_len + offs_m  # [BLOCK_M] position of each query token

    rows = row0 + offs_m
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + b.to(tl.int64) * stride_ptb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    # Keys before the block's first query position are visible to every row: no mask there.
    # The diagonal steps after them mask; each row sees at least its own key in the first one.
    full_end = (prefix_len + m0) // BLOCK_N * BLOCK_N
    end = tl.minimum(seq_len, prefix_len + m0 + BLOCK_M)  # later keys are hidden from every row
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _extend_step(
            q,
            acc,
            m_i,
            l_i,
            n0 + offs_n,
            q_pos,
            end,
            page_row,
            k_base,
            v_base,
            stride_kp,
            stride_ks,
            stride_vp,
            stride_vs,
            scale_log2e,
            offs_d,
            mask_d,
            PAGE_SIZE,
            False,
            EVEN_D,
            DOT_PRECISION,
        )
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _extend_step(
            q,
            acc,
            m_i,
            l_i,
            n0 + offs_n,
            q_pos,
            end,
            page_row,
            k_base,
            v_base,
            stride_kp,
            stride_ks,
            stride_vp,
            stride_vs,
            scale_log2e,
            offs_d,
            mask_d,
            PAGE_SIZE,
            True,
            EVEN_D,
            DOT_PRECISION,
        )

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_starts: torch.Tensor,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_pages, page_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, the cache {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache, v_cache must share one dtype of {_DTYPES}, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    batch = page_table.shape[0] if page_table.dim() == 2 else -1
    if page_table.dim() != 2 or page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        raise ValueError(
            f"page_table must be [B, max_pages] int32 with a contiguous last dim, got "
            f"{tuple(page_table.shape)} {page_table.dtype}"
        )
    for name, t in (
        ("seq_lens", seq_lens),
        ("extend_lens", extend_lens),
        ("extend_starts", extend_starts),
    ):
        if t.shape != (batch,) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous [B={batch}] int32 tensor, got "
                f"{tuple(t.shape)} {t.dtype}"
            )
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("page_table", page_table),
        ("seq_lens", seq_lens),
        ("extend_lens", extend_lens),
        ("extend_starts", extend_starts),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]: new tokens of every sequence, concatenated
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], already holding the new tokens' K
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32: KV length after this step (prefix + new)
    extend_lens: torch.Tensor,  # [B] int32: new tokens per sequence, each <= seq_lens[b]
    extend_starts: torch.Tensor,  # [B] int32: row of q where sequence b starts (exclusive cumsum)
    max_extend_len: int,  # host-side max of extend_lens: sizes the grid without a sync
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [T, Hq, D], q's dtype
    config: ExtendConfig | None = None,
    first_seq: int = 0,  # sequences before it are left alone (their rows of out untouched)
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    _check_inputs(q, k_cache, v_cache, page_table, seq_lens, extend_lens, extend_starts)
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = page_table.shape[0]
    if max_extend_len < 0:
        raise ValueError(f"max_extend_len must be >= 0, got {max_extend_len}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    if not 0 <= first_seq <= batch:
        raise ValueError(f"first_seq must be in [0, {batch}], got {first_seq}")
    if num_tokens == 0 or batch == first_seq or max_extend_len == 0:
        return out
    cfg = config or default_extend_config(head_dim, q.dtype)
    grid = (cdiv(max_extend_len, cfg.block_m), num_q_heads, batch - first_seq)
    block_d = max(16, next_power_of_2(head_dim))
    _extend_kernel[grid](
        q, k_cache, v_cache, out, page_table, seq_lens, extend_lens, extend_starts,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        page_table.stride(0), first_seq,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=page_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
