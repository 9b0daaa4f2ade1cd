"""Triton paged decode attention (one new token per sequence), GQA-grouped and split-K.

One program owns (sequence, KV head, split): the query heads that share the KV head are its rows, so
each KV page is read from memory once for the whole group. Long contexts are cut into `num_splits`
chunks processed in parallel (flash-decoding); a second kernel merges the chunks' partial outputs by
their log-sum-exp. With one split the first kernel writes the output directly.
The torch reference is `attention_ref.decode_attention_ref`.

With `new_token` the first kernel also does what runs before it otherwise (`triton_rotary`'s rotary
and KV store): it rotates q and the new token's k, and the program whose split holds the new
position writes k and v to the cache and attends to them from registers (no other program reads
that position), one launch fewer a layer. Reference: `attention_ref.decode_with_new_token_ref`
(its input is an `attention_ref.NewToken`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention_ref import NewToken
from pdserve.kernels.launch_math import next_power_of_2
from pdserve.kernels.triton_paged_rows import load_rows

_LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_SPLITS = 16


class DecodeConfig(NamedTuple):
    """Launch parameters of the first kernel; `num_splits=None` lets the launcher choose."""

    block_n: int = 64  # KV tokens per inner step
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None


@triton.jit
def _rotation(cos_sin_row, offs_d, HALF: tl.constexpr):
    """Per dimension d of a head: (cos, signed sin, partner) so that a rotate-half rotation is
    x * cos + x[partner] * sin; dimensions past the rotary ones keep x (cos 1, sin 0)."""
    first = offs_d < HALF
    rotated = offs_d < 2 * HALF
    j = tl.where(first, offs_d, offs_d - HALF)
    cos = tl.load(cos_sin_row + j, mask=rotated, other=1.0)
    sin = tl.load(cos_sin_row + HALF + j, mask=rotated, other=0.0)
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    return cos, tl.where(first, -sin, sin), partner, rotated


@triton.jit
def _decode_step(
    q,
    acc,
    m_i,
    l_i,
    offs,
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
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the KV tokens `offs` ([BLOCK_N] indices in the sequence)."""
    mask_n = offs < end
    if MASK_N:
        page = tl.load(page_row + offs // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(page_row + offs // PAGE_SIZE).to(tl.int64)
    in_page = offs % PAGE_SIZE
    k = load_rows(
        k_base, page * stride_kp + in_page * stride_ks, offs_d, mask_n, mask_d, MASK_N, EVEN_D
    )  # [BLOCK_N, BLOCK_D]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_H, N]
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(
        v_base, page * stride_vp + in_page * stride_vs, offs_d, mask_n, mask_d, MASK_N, EVEN_D
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Integers that follow the batch's shape (the page table's width, the split count and the partial
# buffers' strides it sets) are not specialized on: Triton would compile a new variant the first
# time a value of another class (1, a multiple of 16, other) came, in a serving step (a compile of
# this kernel stalled the first concurrent load after startup, benchmarks/gpu/compile_watch.py).
_SPLIT_INTS = ["num_splits", "stride_pob", "stride_poh", "stride_plb", "stride_plh"]


@triton.jit(do_not_specialize=[*_SPLIT_INTS, "stride_ptb"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,  # [num_pages, page_size, Hkv, D]
    page_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    part_out_ptr,  # [B, Hq, S, D] float32 (unused when DIRECT_OUT)
    part_lse_ptr,  # [B, Hq, S] float32, log2 units (unused when DIRECT_OUT)
    out_ptr,  # [B, Hq, D] (used only when DIRECT_OUT)
    k_new_ptr,  # [B, Hkv, D] (FUSE_NEW only, as are the next four)
    v_new_ptr,  # [B, Hkv, D]
    positions_ptr,  # [B] int
    slots_ptr,  # [B] int: page_id * page_size + offset
    cos_sin_ptr,  # [max_positions, 2 * HALF] float32: cos | sin
    scale_log2e,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ptb,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    stride_cs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FUSE_NEW: tl.constexpr,
    HALF: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # Splits are whole BLOCK_N steps so only the last step of a split needs a mask.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP + offs_h  # [BLOCK_H]

    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    if FUSE_NEW:
        last = seq_len - 1
        owns_new = (last >= start) & (last < end)
        pos = tl.load(positions_ptr + b).to(tl.int64)
        cos, sin, partner, rotated = _rotation(cos_sin_ptr + pos * stride_cs, offs_d, HALF)
        q_partner = tl.load(
            q_ptrs - offs_d[None, :] + partner[None, :],
            mask=mask_h[:, None] & rotated[None, :],
            other=0.0,
        )
        q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(
            q_ptr.dtype.element_ty
        )  # rounded as the separate rotary kernel stores it
        k_row = k_new_ptr + b.to(tl.int64) * stride_knb + kv_head * stride_knh
        k_new = tl.load(k_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        k_partner = tl.load(k_row + partner, mask=rotated, other=0.0).to(tl.float32)
        cache_dtype = k_ptr.dtype.element_ty
        k_new = (k_new * cos + k_partner * sin).to(cache_dtype)  # [BLOCK_D]
        v_new_row = v_new_ptr + b.to(tl.int64) * stride_vnb + kv_head * stride_vnh
        v_new = tl.load(v_new_row + offs_d, mask=mask_d, other=0.0).to(cache_dtype)
        if owns_new:  # the one program whose split holds the new position stores it
            slot = tl.load(slots_ptr + b).to(tl.int64)
            page = slot // PAGE_SIZE
            in_page = slot % PAGE_SIZE
            k_dst = k_ptr + page * stride_kp + in_page * stride_ks + kv_head * stride_kh
            v_dst = v_ptr + page * stride_vp + in_page * stride_vs + kv_head * stride_vh
            tl.store(k_dst + offs_d, k_new, mask=mask_d)
            tl.store(v_dst + offs_d, v_new, mask=mask_d)
        end = tl.where(owns_new, last, end)  # the cache loop stops before it: from registers

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + b.to(tl.int64) * stride_ptb
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    # Whole steps need no token mask; only the split's last, partial step does.
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _decode_step(
            q,
            acc,
            m_i,
            l_i,
            n0 + offs_n,
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
        acc, m_i, l_i = _decode_step(
            q,
            acc,
            m_i,
            l_i,
            n0 + offs_n,
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

    if FUSE_NEW:
        if owns_new:
            qk = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2e
            m_new = tl.maximum(m_i, qk)  # [BLOCK_H]
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    # An empty split (start >= end) leaves l_i == 0: write a zero output with lse = -inf.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_mask = mask_h[:, None] & mask_d[None, :]
    if DIRECT_OUT:
        o_ptrs = (
            out_ptr + b.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        base = b.to(tl.int64) * stride_pob + split * stride_pos
        po_ptrs = part_out_ptr + base + q_heads[:, None] * stride_poh + offs_d[None, :]
        tl.store(po_ptrs, out, mask=out_mask)
        lse = m_i + tl.log2(l_i)  # -inf for an empty split
        lse_ptrs = part_lse_ptr + b.to(tl.int64) * stride_plb + q_heads * stride_plh + split
        tl.store(lse_ptrs, lse, mask=mask_h)


@triton.jit(do_not_specialize=_SPLIT_INTS)
def _decode_merge_kernel(
    part_out_ptr,  # [B, Hq, S, D] float32
    part_lse_ptr,  # [B, Hq, S] float32, log2 units
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(
        part_lse_ptr + b * stride_plb + h * stride_plh + offs_s, mask=mask_s, other=float("-inf")
    )  # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)  # empty splits weigh 0
    po_ptrs = part_out_ptr + b * stride_pob + h * stride_poh + offs_s[:, None] * stride_pos
    part = tl.load(po_ptrs + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [BLOCK_D]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _num_sms(device.index or 0) if device.type == "cuda" else 8


_DEFAULT = DecodeConfig()
_UNSPLIT = DecodeConfig(block_n=128, num_splits=1)


def default_config(
    batch: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> DecodeConfig:
    """64 KV tokens a step, splits chosen by `choose_num_splits`; when the grid fills the GPU
    (that function's one split) and the head is small, one split of 128 tokens a step.

    Measured on an H200 (`benchmarks/gpu/decode_config_sweep.py`, head_dim 64, 8 KV heads, 16
    layers in a CUDA graph): 128 tokens a step took 38.1 against 41.8 us a layer at 64 x 1,024
    and 140.1 against 147.3 at 256 x 1,024; batches that need splits keep 64, whose splits are
    shorter (batch 1 splits its context into ~16).
    """
    if head_dim <= 64 and batch * num_kv_heads >= _sm_count(device):
        return _UNSPLIT
    return _DEFAULT


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    device: torch.device,
    max_seq_len: int | None = None,
    block_n: int = 64,
) -> int:
    """Split only a grid that leaves SMs idle: about two programs per SM, each of >= 2 steps.

    Measured on an H100: with B * Hkv >= the SM count one split is fastest (2 splits doubled the
    time at 64 x 1024); at batch 1 eight splits of 128 tokens were fastest.
    """
    num_sms = _sm_count(device)
    programs = max(1, batch * num_kv_heads)
    if programs >= num_sms:
        return 1
    splits = min(_MAX_SPLITS, math.ceil(2 * num_sms / programs))
    if max_seq_len is not None:
        splits = min(splits, max(1, math.ceil(max_seq_len / (2 * block_n))))
    return splits


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_pages, page_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_q_heads, head_dim = q.shape
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
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.dtype != torch.int32:
        raise ValueError(
            f"page_table must be [B={batch}, max_pages] int32, got "
            f"{tuple(page_table.shape)} {page_table.dtype}"
        )
    if page_table.stride(-1) != 1:
        raise ValueError("page_table needs a contiguous last dimension")
    if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        raise ValueError(
            f"seq_lens must be a contiguous [B={batch}] int32 tensor, got "
            f"{tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("page_table", page_table),
        ("seq_lens", seq_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _check_new_token(new: NewToken, q: torch.Tensor, k_cache: torch.Tensor) -> None:
    batch, _, head_dim = q.shape
    kv_shape = (batch, k_cache.shape[2], head_dim)
    cos_sin = new.cos_sin_cache
    problems = []
    if tuple(new.k.shape) != kv_shape or tuple(new.v.shape) != kv_shape:
        problems.append(f"k and v must be {kv_shape}, got {tuple(new.k.shape)}, "
                        f"{tuple(new.v.shape)}")  # fmt: skip
    elif new.k.dtype != q.dtype or new.v.dtype != q.dtype:
        problems.append(f"k and v must be {q.dtype}, got {new.k.dtype}, {new.v.dtype}")
    elif new.k.stride(-1) != 1 or new.v.stride(-1) != 1:
        problems.append("k and v need a contiguous last dimension")
    for name, t in (("positions", new.positions), ("slots", new.slots)):
        if t.shape != (batch,) or t.dtype not in (torch.int32, torch.int64):
            problems.append(f"{name} must be [B={batch}] int32/int64, got {tuple(t.shape)} "
                            f"{t.dtype}")  # fmt: skip
        elif not t.is_contiguous():
            problems.append(f"{name} must be contiguous")
    if (
        cos_sin.dim() != 2
        or cos_sin.dtype != torch.float32
        or cos_sin.shape[1] % 2
        or cos_sin.shape[1] > head_dim
        or cos_sin.stride(-1) != 1
    ):
        problems.append(f"cos_sin_cache must be [max_positions, rotary_dim <= {head_dim}] float32 "
                        f"(even width, contiguous rows), got {tuple(cos_sin.shape)} "
                        f"{cos_sin.dtype}")  # fmt: skip
    devices = {t.device for t in (new.k, new.v, new.positions, new.slots, cos_sin)}
    if devices != {q.device}:
        problems.append(
            f"new_token's tensors must be on {q.device}, got {sorted(map(str, devices))}"
        )
    if problems:
        raise ValueError("decode_attention new_token: " + "; ".join(problems))


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32, KV length including the new token (>= 1)
    scale: float,
    *,
    out: torch.Tensor | None = None,  # [B, Hq, D], q's dtype
    max_seq_len: int | None = None,  # optional host-side bound, only used to pick num_splits
    config: DecodeConfig | None = None,
    new_token: NewToken | None = None,  # q and this k not rotated yet, k and v not stored yet
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each sequence's one new query token over its paged KV; no host sync. With
    `new_token`, the rotary and the new token's KV store happen inside (q is not modified)."""
    _check_inputs(q, k_cache, v_cache, page_table, seq_lens)
    if new_token is not None:
        _check_new_token(new_token, q, k_cache)
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    if batch == 0:
        return out
    cfg = config or default_config(batch, num_kv_heads, head_dim, q.device)
    num_splits = cfg.num_splits or choose_num_splits(
        batch, num_kv_heads, q.device, max_seq_len, cfg.block_n
    )
    if not 1 <= num_splits <= 64:
        raise ValueError(f"num_splits must be in [1, 64], got {num_splits}")
    group = num_q_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    block_h = max(16, next_power_of_2(group))  # tl.dot needs 16 rows
    direct = num_splits == 1
    if direct:
        part_out = out.new_empty((1, 1, 1, 1), dtype=torch.float32)
        part_lse = out.new_empty((1, 1, 1), dtype=torch.float32)
    else:
        part_out = out.new_empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32)
        part_lse = out.new_empty((batch, num_q_heads, num_splits), dtype=torch.float32)

    if new_token is None:  # pointers the kernel never reads (FUSE_NEW off): no allocation
        k_new = v_new = cos_sin = q
        positions = slots = seq_lens
        new_strides, half = (0, 0, 0, 0, 0), 1
    else:
        k_new, v_new, positions, slots, cos_sin = new_token
        new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                       cos_sin.stride(0))  # fmt: skip
        half = cos_sin.shape[1] // 2
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, part_out, part_lse, out,
        k_new, v_new, positions, slots, cos_sin,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        *new_strides,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        BLOCK_H=block_h,
        BLOCK_N=cfg.block_n, PAGE_SIZE=page_size, DIRECT_OUT=direct,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FUSE_NEW=new_token is not None, HALF=half,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not direct:
        _decode_merge_kernel[(batch, num_q_heads)](
            part_out, part_lse, out, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_power_of_2(num_splits),
            num_warps=4 if head_dim > 64 else 2,
        )  # fmt: skip
    return out
