"""Triton attention for speculative tree verification over a paged KV cache.

Token t of sequence b sees the KV positions below tree_starts[b] and, of tree_starts[b] ..
seq_lens[b] - 1, those its row of the tree mask allows (its ancestors in the draft tree and
itself). One program owns one token and one query head and walks the sequence's keys in blocks
with an online softmax: tree passes are short (a few dozen tokens a sequence), so this favours
simplicity over the extend kernel's tiling. The torch reference is
`tree_attention_ref.tree_extend_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import next_power_of_2

_LOG2E = 1.4426950408889634


@triton.jit
def _tree_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,  # [num_pages, page_size, Hkv, D]
    out_ptr,  # [T, Hq, D]
    page_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    tree_starts_ptr,  # [B] int32
    seq_of_ptr,  # [T] int32: the sequence of each token
    mask_ptr,  # [T, W] int8
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
    stride_mt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(seq_of_ptr + tok)
    seq_len = tl.load(seq_lens_ptr + seq)
    tree_start = tl.load(tree_starts_ptr + seq)
    kv_head = head // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + tok * stride_qt + head * stride_qh + offs_d, mask=mask_d, other=0.0)
    q = q.to(tl.float32)
    m_i = tl.full([1], -float("inf"), tl.float32)  # [1]: loop-carried, typed from the start
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_ptb
    for start in range(0, seq_len, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        in_seq = k_pos < seq_len
        page = tl.load(page_row + k_pos // PAGE_SIZE, mask=in_seq, other=0).to(tl.int64)
        in_page = (k_pos % PAGE_SIZE).to(tl.int64)
        rows = in_seq[:, None] & mask_d[None, :]
        k_off = page * stride_kp + in_page * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=rows, other=0.0)
        qk = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale_log2e  # [BLOCK_N]
        w = k_pos - tree_start
        in_tree = in_seq & (w >= 0)
        allowed = tl.load(mask_ptr + tok.to(tl.int64) * stride_mt + w, mask=in_tree, other=0)
        visible = in_seq & ((w < 0) | (allowed != 0))
        qk = tl.where(visible, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a block with nothing visible
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v_off = page * stride_vp + in_page * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=rows, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / l_i
    o_ptr = out_ptr + tok * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def tree_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: list[int],  # [B] KV positions covered (tree_start + tree width)
    extend_lens: list[int],  # [B] new tokens per sequence
    tree_starts: list[int],  # [B]
    tree_mask: torch.Tensor,  # [T, W] bool
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Tree attention (see the module docstring); checks shapes and dtypes before launch."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim or k_cache.dtype != q.dtype:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}, v_cache {tuple(v_cache.shape)}: "
            f"expected [pages, page_size, Hkv, {head_dim}] {q.dtype} each"
        )
    if num_heads % num_kv_heads or sum(extend_lens) != num_tokens:
        raise ValueError(
            f"{num_heads} query heads over {num_kv_heads} KV heads, {sum(extend_lens)} tokens "
            f"in extend_lens for {num_tokens} rows of q: expected a multiple and equal counts"
        )
    if tree_mask.dim() != 2 or tree_mask.shape[0] != num_tokens:
        raise ValueError(f"tree_mask {tuple(tree_mask.shape)}: expected [{num_tokens}, W]")
    if any(s - t > tree_mask.shape[1] or t < 0 for s, t in zip(seq_lens, tree_starts)):
        raise ValueError(
            f"trees of {seq_lens} - {tree_starts} positions, mask of {tree_mask.shape}"
        )
    contiguous = all(t.stride(-1) == 1 for t in (q, k_cache, v_cache))
    if not contiguous or page_table.dtype != torch.int32:
        raise ValueError("q and the caches need contiguous head dims; page_table int32")
    device = q.device
    seq_of = torch.repeat_interleave(
        torch.arange(len(extend_lens), dtype=torch.int32), torch.tensor(extend_lens)
    ).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    starts = torch.tensor(tree_starts, dtype=torch.int32, device=device)
    mask = tree_mask.to(device=device, dtype=torch.int8).contiguous()
    out = torch.empty_like(q)
    _tree_kernel[(num_tokens, num_heads)](
        q, k_cache, v_cache, out, page_table, lens, starts, seq_of, mask, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        page_table.stride(0), mask.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_N=64, PAGE_SIZE=k_cache.shape[1],
    )  # fmt: skip
    return out
