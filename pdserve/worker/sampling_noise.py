"""The seeded rows' noise: a counter-based hash of (seed, step, token id), so a seeded request
draws the same tokens whatever else is in its batch and on whichever device
(kernels/triton_sampling.py computes the same hash on the GPU)."""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 on a uint64 array (its products wrap mod 2**64 as intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_keys(seeds: list[int], steps: list[int]) -> np.ndarray:
    """[S, 2] int64: the two 32-bit noise keys of each seeded row at its step (the number of
    tokens it has output), from splitmix64(splitmix64(seed) ^ step)."""
    mixed = splitmix64_array(
        splitmix64_array(np.array([s & MASK64 for s in seeds], dtype=np.uint64))
        ^ np.array(steps, dtype=np.uint64)
    )
    return split_keys(mixed)


def split_keys(keys: np.ndarray) -> np.ndarray:
    """[N] uint64 -> [N, 2] int64: each key's low and high 32 bits."""
    return np.stack((keys & np.uint64(MASK32), keys >> np.uint64(32)), axis=1).astype(np.int64)


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
