"""The one object a forward pass receives: a ragged batch of new tokens plus where their KV lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Sequences b = 0..B-1 each add extend_lens[b] new tokens after a cached prefix.

    Tokens are concatenated in sequence order. A pure decode step has every extend_len == 1.
    """

    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    slots: torch.Tensor  # [T] int64, device: page_id * page_size + offset for each new token's KV
    page_table: torch.Tensor  # [B, max_pages] int32, device (unused entries 0)
    seq_lens: torch.Tensor  # [B] int32, device: KV length after this step
    seq_lens_cpu: list[int]  # [B]
    extend_lens_cpu: list[int]  # [B]
    logit_idx: torch.Tensor  # [B] int64, device: index in T of each sequence's last new token
    is_decode: bool

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
