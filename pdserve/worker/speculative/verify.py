"""Acceptance rules for speculative decoding.

The worker's drafts are deterministic (prompt lookup, greedy EAGLE): a draft token x is a function
of the context, its draft distribution q is one-hot at x. Then the exact rule needs no q at all:
draw y from the target distribution p exactly as the plain loop would (same sampler, same seeded
noise for the step), accept x if y == x and go on to the next position, else emit y and stop. The
accepted prefix plus y is distributed as p token by token, because P(accept x) = p(x) and, on a
rejection, y is distributed as p without x renormalised, which is max(p - q, 0) normalised for a
one-hot q. Greedy rows and seeded rows then give the plain loop's tokens exactly
(spec_step.py). `rejection_sample` is the rule for a draft drawn from a distribution q (Leviathan
et al. 2023, Chen et al. 2023): accept x with probability min(1, p(x) / q(x)), else draw from
max(p - q, 0) normalised.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Verdict(NamedTuple):
    accepted: torch.Tensor  # [B] bool: the draft token is kept
    token_ids: torch.Tensor  # [B] int64: the draft token when accepted, else the residual draw


def rejection_sample(
    target_probs: torch.Tensor,  # [B, V] float: p, rows sum to 1
    draft_probs: torch.Tensor,  # [B, V] float: q, the distribution each draft was drawn from
    draft_ids: torch.Tensor,  # [B] int64: x ~ q
    generator: torch.Generator | None = None,
) -> Verdict:
    """One position of speculative sampling: the returned token is distributed as p."""
    if target_probs.shape != draft_probs.shape or target_probs.dim() != 2:
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)} and draft_probs "
            f"{tuple(draft_probs.shape)} must both be [B, V]"
        )
    rows = torch.arange(draft_ids.numel(), device=draft_ids.device)
    p_x = target_probs[rows, draft_ids]  # [B]
    q_x = draft_probs[rows, draft_ids]  # [B]
    u = torch.rand(p_x.shape, generator=generator, device=p_x.device, dtype=p_x.dtype)
    accepted = u * q_x < p_x  # u < p/q without dividing by a q that may be 0
    residual = (target_probs - draft_probs).clamp_min(0.0)  # [B, V]
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q leaves no residual; the draft is then always accepted, so any row will do.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs)
    resampled = torch.multinomial(residual, 1, generator=generator).view(-1)  # [B]
    return Verdict(accepted, torch.where(accepted, draft_ids, resampled))
