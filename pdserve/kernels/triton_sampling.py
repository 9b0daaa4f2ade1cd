"""Triton next-token draw for rows without top-k / top-p: greedy, temperature and min-p in one
kernel per batch, two passes over each row's logits (its max, then the race).

The torch sampler (worker/sampler.py `_sample_from`) draws by the exponential race
argmax(p / E), E ~ Exp(1), over p = softmax(logits / T) masked by min-p: about thirty [B, V]
element-wise kernels (softmax, the counter-based hash of the seeded noise, log, division),
~2.5 ms at batch 64 over a 128k vocabulary on an H200. The same race in log space,
argmax(logits / T - log E), needs no softmax: min-p keeps token j when
p_j >= min_p * p_max, i.e. (l_j - l_max) / T >= log(min_p). Each row's noise comes from the same
hash of (its keys, token id) as the torch path's seeded noise, so a seeded row draws the same
token on either path (up to float rounding between two nearly tied tokens); unseeded rows get
keys drawn from the caller's generator each step.

Disallowed tokens arrive as -inf logits (min_new_tokens' bans, a grammar applied beforehand) or
as a grammar's bitmask (xgrammar's [B, ceil(V / 32)] int32, bit j of word w allowing token
32 w + j) that the kernel reads beside the logits, so a constrained step needs no masked copy of
its logits; either way they never win, greedy rows included. A row with nothing allowed returns
token 0, as torch's argmax does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (worker/sampling_noise.py `hash32` on int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32)  # mod 2**32, whatever width the product promoted to
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _allowed_logits(base, mask_row, ids, vocab_size, HAS_MASK: tl.constexpr):
    """The logits at `ids`, -inf past the vocabulary and where the row's bitmask forbids."""
    x = tl.load(base + ids, mask=ids < vocab_size, other=float("-inf"))
    if HAS_MASK:
        words = tl.load(mask_row + (ids >> 5), mask=ids < vocab_size, other=0)
        x = tl.where(((words >> (ids & 31)) & 1) != 0, x, float("-inf"))
    return x


@triton.jit
def _race_kernel(
    logits_ptr,  # [B, V] float32
    temps_ptr,  # [B] float32 (greedy rows: ignored)
    log_min_ps_ptr,  # [B] float32: log(min_p), -inf for none
    greedy_ptr,  # [B] int8: 1 = argmax
    keys_ptr,  # [B, 2] int64 holding 32-bit values
    mask_ptr,  # [B, W] int32 grammar bitmask (HAS_MASK), else unused
    out_ptr,  # [B] int64
    vocab_size,
    stride_row,
    stride_mask,
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    # Pass 1: the row's largest logit (min-p's reference, and the greedy answer).
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        ids = start + offs
        x = _allowed_logits(base, mask_ptr + row * stride_mask, ids, vocab_size, HAS_MASK)
        take = x > best
        best = tl.where(take, x, best)
        best_id = tl.where(take, ids, best_id)
    row_max = tl.max(best, axis=0)
    # First index among the maxima, as torch.argmax.
    greedy_id = tl.min(tl.where(best == row_max, best_id, vocab_size), axis=0)
    inv_t = 1.0 / tl.load(temps_ptr + row)
    floor = tl.load(log_min_ps_ptr + row)  # min-p: (l - l_max) / T >= log(min_p)
    key0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    key1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    # Pass 2: the race.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        ids = start + offs
        x = _allowed_logits(base, mask_ptr + row * stride_mask, ids, vocab_size, HAS_MASK)
        scaled = (x - row_max) * inv_t
        bits = _hash32(_hash32(ids.to(tl.uint32) ^ key0) ^ key1)
        uniform = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (0, 1)
        score = scaled - tl.log(-tl.log(uniform))  # log p - log E, up to the row's constant
        score = tl.where((scaled >= floor) & (x > float("-inf")), score, float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        best_id = tl.where(take, ids, best_id)
    top = tl.max(best, axis=0)
    drawn = tl.min(tl.where(best == top, best_id, vocab_size), axis=0)
    # Every allowed token lost to -inf only if none was allowed: fall back to the greedy token.
    drawn = tl.where(top > float("-inf"), drawn, greedy_id)
    drawn = tl.where(tl.load(greedy_ptr + row) != 0, greedy_id, drawn)
    tl.store(out_ptr + row, tl.where(drawn < vocab_size, drawn, 0).to(tl.int64))


def race_sample(
    logits: torch.Tensor,  # [B, V] float32, disallowed tokens at -inf
    temperatures: torch.Tensor,  # [B] or [B, 1] float32
    min_ps: torch.Tensor,  # [B] or [B, 1] float32
    is_greedy: torch.Tensor,  # [B] bool
    keys: torch.Tensor,  # [B, 2] int64, 32-bit values
    bitmask: torch.Tensor | None = None,  # [B, ceil(V / 32)] int32: allowed tokens; None: all
) -> torch.Tensor:  # [B] int64
    """One token per row: argmax for greedy rows, else a draw from softmax(logits / T) after
    min-p, over the tokens the bitmask allows (module docstring). Nothing is read back to the
    host."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be [B, V] float32 with contiguous rows, got {tuple(logits.shape)} "
            f"{logits.dtype} strides {logits.stride()}"
        )
    batch, vocab_size = logits.shape
    if keys.shape != (batch, 2):
        raise ValueError(f"keys must be [{batch}, 2], got {tuple(keys.shape)}")
    temps = temperatures.reshape(batch).to(torch.float32).contiguous()
    log_min_ps = torch.log(min_ps.reshape(batch).to(torch.float32))  # log(0) = -inf: no floor
    greedy = is_greedy.reshape(batch).to(torch.int8).contiguous()
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if bitmask is not None and (
        bitmask.dtype != torch.int32 or bitmask.shape != (batch, (vocab_size + 31) // 32)
    ):
        raise ValueError(
            f"bitmask must be [{batch}, {(vocab_size + 31) // 32}] int32, got "
            f"{tuple(bitmask.shape)} {bitmask.dtype}"
        )
    mask = bitmask.contiguous() if bitmask is not None else out  # unread without a mask
    if batch:
        _race_kernel[(batch,)](
            logits, temps, log_min_ps, greedy, keys.contiguous(), mask, out,
            vocab_size, logits.stride(0), mask.stride(0), BLOCK=_BLOCK,
            HAS_MASK=bitmask is not None,
        )  # fmt: skip
    return out
