"""Torch reference attention over a paged KV cache: the ground truth every kernel is tested against.

Cache layout (per layer): k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim].
A token's slot is page_id * page_size + offset; `page_table[b, i]` is the i-th page of sequence b.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def store_kv(
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    slots: torch.Tensor,  # [T] int64: page_id * page_size + offset
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v.to(v_cache.dtype)


def gather_seq_kv(
    cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    page_ids: torch.Tensor,  # [>= ceil(seq_len / page_size)] int
    seq_len: int,
) -> torch.Tensor:  # [seq_len, Hkv, D]
    page_size = cache.shape[1]
    num_pages = (seq_len + page_size - 1) // page_size
    pages = cache[page_ids[:num_pages].long()]  # [n, page_size, Hkv, D]
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """q: [Lq, Hq, D] at positions prefix_len..; k, v: [Lk, Hkv, D] with Lk = prefix_len + Lq."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [Hq, Lq, Lk]
    q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + prefix_len
    k_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]: the new tokens of every sequence, concatenated
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], already holding the new tokens' K
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: list[int],  # [B] KV length after this step (prefix + new)
    extend_lens: list[int],  # [B] new tokens per sequence; sum == T
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    out = torch.empty_like(q)
    start = 0
    for b, (seq_len, ext_len) in enumerate(zip(seq_lens, extend_lens)):
        k = gather_seq_kv(k_cache, page_table[b], seq_len)
        v = gather_seq_kv(v_cache, page_table[b], seq_len)
        out[start : start + ext_len] = _attend(
            q[start : start + ext_len], k, v, seq_len - ext_len, scale
        )
        start += ext_len
    return out


def decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]: one new token per sequence
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32: KV length including the new token
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """Batched decode: pad every sequence to the longest and mask, in float32."""
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max())
    num_pages = (max_len + page_size - 1) // page_size
    pages = page_table[:, :num_pages].long()  # [B, n]
    k = k_cache[pages].reshape(batch, -1, num_kv_heads, head_dim)[:, :max_len].float()
    v = v_cache[pages].reshape(batch, -1, num_kv_heads, head_dim)[:, :max_len].float()
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k) * scale  # [B, Hkv, G, S]
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None].long()
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgs,bshd->bhgd", probs, v)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


class NewToken(NamedTuple):
    """Each sequence's new token as the q/k/v projection left it (q, k not rotated yet): k and v
    go to the cache at `slots`, rotated by `cos_sin_cache[positions]` (rotate-half layout; the
    dimensions past the cache's width are left as they are)."""

    k: torch.Tensor  # [B, Hkv, D]
    v: torch.Tensor  # [B, Hkv, D]
    positions: torch.Tensor  # [B] int32/int64
    slots: torch.Tensor  # [B] int64: page_id * page_size + offset
    cos_sin_cache: torch.Tensor  # [max_positions, rotary_dim] float32: cos | sin halves


def decode_with_new_token_ref(
    q: torch.Tensor,  # [B, Hq, D], not rotated yet (left as it is)
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32: KV length including the new token
    scale: float,
    new: NewToken,
) -> torch.Tensor:  # [B, Hq, D]
    """Rotary on q and the new k, the new k and v stored at their slots, then decode attention:
    what the model runs as three steps when the backend has no fused decode."""
    from pdserve.kernels.rotary_ref import apply_rotary_ref

    rot = new.cos_sin_cache.shape[-1]
    if rot == q.shape[-1]:
        q, k = apply_rotary_ref(q, new.k, new.positions, new.cos_sin_cache)
    else:  # partial rotary: the tail as it is
        q_rot, k_rot = apply_rotary_ref(
            q[..., :rot], new.k[..., :rot], new.positions, new.cos_sin_cache
        )
        q = torch.cat([q_rot, q[..., rot:]], dim=-1)
        k = torch.cat([k_rot, new.k[..., rot:]], dim=-1)
    store_kv(k_cache, v_cache, new.slots, k, new.v)
    return decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, scale)
