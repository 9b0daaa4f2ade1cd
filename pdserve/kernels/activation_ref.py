"""SiLU-and-multiply: the gated activation of the Llama MLP over a merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] with the gate in the first half and up in the second; returns [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
