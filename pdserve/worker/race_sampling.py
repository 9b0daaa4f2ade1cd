"""The exponential-race draw over a grammar's bitmask: one Triton kernel on CUDA
(kernels/triton_sampling.py), the same computation in torch elsewhere.

For each row: the greedy token (the first largest allowed logit) or a draw from
softmax(logits / T) after min-p, as argmax over allowed tokens of (l - l_max) / T - log E with the
seeded hash noise E of worker/sampling_noise.py keyed by the row's two 32-bit keys. Tokens the
bitmask forbids never win; a row with nothing allowed returns token 0.
"""

from __future__ import annotations

import torch

from pdserve.worker.grammar_mask import apply_bitmask
from pdserve.worker.sampling_noise import seeded_exponential


def race_draw(
    logits: torch.Tensor,  # [B, V] float32, contiguous rows
    temperatures: torch.Tensor | None,  # [B] float32 (greedy rows: ignored)
    min_ps: torch.Tensor | None,  # [B] float32, 0: off
    is_greedy: torch.Tensor | None,  # [B] bool, or numbers: nonzero = greedy
    keys: torch.Tensor | None,  # [B, 2] int64 holding 32-bit values
    bitmask: torch.Tensor | None = None,  # [B, ceil(V / 32)] int32; None: every token allowed
    any_min_p: bool = True,  # False: every min_p is 0 (known on the host)
    all_greedy: bool = False,  # True: every row is greedy (the four above may then be None)
    out: torch.Tensor | None = None,  # [B] int64 on the device to write the tokens into
) -> torch.Tensor:  # [B] int64, on the logits' device, not read back
    if logits.is_cuda:
        from pdserve.kernels.triton_sampling import race_sample

        return race_sample(
            logits, temperatures, min_ps, is_greedy, keys, bitmask, any_min_p, all_greedy, out
        )
    if all_greedy:
        drawn = _allowed(logits, bitmask).argmax(dim=-1)
    else:
        assert temperatures is not None and min_ps is not None and is_greedy is not None
        assert keys is not None
        drawn = race_draw_torch(logits, temperatures, min_ps, is_greedy, keys, bitmask)
    return drawn if out is None else out.copy_(drawn)


def greedy_draw(logits: torch.Tensor) -> torch.Tensor:
    """[B] int64: each row's first largest logit, as torch.argmax (logits [B, V] float32); on CUDA
    the race kernel's chunked argmax (torch's reduction took 27 us for one 128k row on the H200,
    profile_decode --batch 1)."""
    return race_draw(logits, None, None, None, None, all_greedy=True)


def _allowed(logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """[B, V] float32: the logits, -inf where the bitmask forbids."""
    logits = logits.to(torch.float32)
    return logits if bitmask is None else apply_bitmask(logits, bitmask)


def race_draw_torch(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    min_ps: torch.Tensor,
    is_greedy: torch.Tensor,
    keys: torch.Tensor,
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`race_draw` in torch ops (the kernel's reference; the CPU's path)."""
    batch, vocab_size = logits.shape
    logits = _allowed(logits, bitmask)
    greedy_ids = logits.argmax(dim=-1)  # [B]
    is_greedy = is_greedy.view(batch) != 0
    if bool(is_greedy.all()):
        return greedy_ids
    row_max = logits.max(dim=-1, keepdim=True).values  # [B, 1]
    scaled = (logits - row_max) / temperatures.view(batch, 1)  # [B, V]
    noise = seeded_exponential(keys.view(batch, 2), vocab_size)  # [B, V]
    score = scaled - torch.log(noise)
    floor = torch.log(min_ps.view(batch, 1).to(torch.float32))  # log(0) = -inf: no floor
    score = score.masked_fill((scaled < floor) | (logits == float("-inf")), float("-inf"))
    drawn = score.argmax(dim=-1)
    nothing = score.max(dim=-1).values == float("-inf")  # only when nothing is allowed
    drawn = torch.where(nothing | is_greedy, greedy_ids, drawn)
    return drawn
