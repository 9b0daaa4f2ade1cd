"""Torch reference attention for speculative tree verification over a paged KV cache.

Sequence b's new tokens see every KV position below tree_starts[b] (the verified context), and
of the positions tree_starts[b] .. seq_lens[b] - 1 (the draft tree's rows) those their row of
tree_mask allows (their ancestors and themselves). A chain's mask is lower triangular, which
makes this `attention_ref.extend_attention_ref`.
"""

from __future__ import annotations

import torch

from pdserve.kernels.attention_ref import gather_seq_kv


def tree_extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]: the new tokens of every sequence, concatenated
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D], already holding the new tokens' K
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: list[int],  # [B] KV positions covered (tree_start + tree width)
    extend_lens: list[int],  # [B] new tokens per sequence; sum == T
    tree_starts: list[int],  # [B] first tree position of each sequence
    tree_mask: torch.Tensor,  # [T, W] bool, W >= max(seq_len - tree_start)
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    if tree_mask.dim() != 2 or tree_mask.shape[0] != q.shape[0]:
        raise ValueError(
            f"tree_mask {tuple(tree_mask.shape)} is invalid: expected [{q.shape[0]}, W]"
        )
    out = torch.empty_like(q)
    start = 0
    for b, (seq_len, ext_len, tree_start) in enumerate(zip(seq_lens, extend_lens, tree_starts)):
        width = seq_len - tree_start
        if width > tree_mask.shape[1] or tree_start < 0:
            raise ValueError(
                f"sequence {b}: tree of {width} positions, mask of {tree_mask.shape[1]}"
            )
        k = gather_seq_kv(k_cache, page_table[b], seq_len)  # [S, Hkv, D]
        v = gather_seq_kv(v_cache, page_table[b], seq_len)
        visible = torch.ones(ext_len, seq_len, dtype=torch.bool, device=q.device)  # [n, S]
        visible[:, tree_start:] = tree_mask[start : start + ext_len, :width].to(q.device)
        out[start : start + ext_len] = _attend_masked(
            q[start : start + ext_len], k, v, visible, scale
        )
        start += ext_len
    return out


def _attend_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [Lq, Hq, D], k, v: [Lk, Hkv, D], visible: [Lq, Lk] bool (each row sees one at least)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [Hq, Lq, Lk]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)
