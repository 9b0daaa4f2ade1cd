"""The one object a forward pass receives: a ragged batch of new tokens plus where their KV lives."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardBatch:
    """Sequences b = 0..B-1 each add extend_lens[b] new tokens after a cached prefix.

    Tokens are concatenated in sequence order. A pure decode step has every extend_len == 1.

    The fields after `is_decode` are what the Triton and FlashInfer attention backends need to run
    without a host sync. `ModelRunner.build_forward_batch` fills them all; a batch built by hand
    (tests) may leave them out and they are derived from the host lists here.
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
    extend_lens: torch.Tensor | None = None  # [B] int32, device: new tokens per sequence
    extend_starts: torch.Tensor | None = None  # [B] int32, device: row in T where b's tokens start
    max_extend_len: int | None = None  # host: max(extend_lens_cpu), sizes the extend kernel's grid
    # Host-side bound on seq_lens; only picks the decode kernel's split count. A CUDA graph sets it
    # to the longest context it may replay, so one capture serves every length.
    max_seq_len: int | None = None
    page_table_cpu: torch.Tensor | None = None  # [B, max_pages] int32, cpu: for FlashInfer's plan
    # LoRA rows grouped by adapter slot (worker/lora/lora_layers.py); None: no adapter in the batch
    lora: Any = None
    # Images and M-RoPE positions of a vision-language model (models/qwen2_vl.py MultimodalBatch)
    mm: Any = None
    # Speculative tree verification (worker/speculative/): new tokens see their sequence's KV
    # below tree_starts[b] and, beyond it, the positions their row of tree_mask allows; None:
    # causal. Only the torch attention backend reads it (kernels/tree_attention_ref.py).
    tree_mask: torch.Tensor | None = None  # [T, W] bool, device
    tree_starts: list[int] | None = None  # [B]

    def __post_init__(self) -> None:
        if self.extend_lens is None:
            self.extend_lens = torch.tensor(
                self.extend_lens_cpu, dtype=torch.int32, device=self.seq_lens.device
            )
        if self.extend_starts is None:
            starts = [0] * len(self.extend_lens_cpu)
            for b in range(1, len(starts)):
                starts[b] = starts[b - 1] + self.extend_lens_cpu[b - 1]
            self.extend_starts = torch.tensor(
                starts, dtype=torch.int32, device=self.seq_lens.device
            )
        if self.max_extend_len is None:
            self.max_extend_len = max(self.extend_lens_cpu, default=0)
        if self.max_seq_len is None:
            self.max_seq_len = max(self.seq_lens_cpu, default=0)

    @functools.cached_property
    def leading_decodes(self) -> tuple[int, int]:
        """(how many sequences at the head of the batch add one token each, the longest KV
        length among them): a mixed step's decodes, which the scheduler puts first. Computed once
        per batch, read by every layer's attention."""
        count = len(self.extend_lens_cpu)
        for i, n in enumerate(self.extend_lens_cpu):
            if n != 1:
                count = i
                break
        return count, max(self.seq_lens_cpu[:count], default=0)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
