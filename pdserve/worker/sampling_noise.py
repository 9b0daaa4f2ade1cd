"""The seeded rows' noise: a counter-based hash of (seed, step, token id), so a seeded request
draws the same tokens whatever else is in its batch and on whichever device
(kernels/triton_sampling.py computes the same hash on the GPU)."""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), split so no product overflows int64."""
    low = x * (c & 0xFFFF)
    high = (x * (c >> 16)) & 0xFFFF
    return (low + (high << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_exponential(seed_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [S, V] float32, a pure function of each row's keys and the token id."""
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=seed_keys.device)  # [V]
    bits = hash32(hash32(token_ids ^ seed_keys[:, :1]) ^ seed_keys[:, 1:])  # [S, V]
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23  # (0, 1), exact in float32
    return -torch.log(uniform)
