"""The Llama-family decoder as a pooling model: embeddings (no head) and sequence classification
(a `score` head, as the published reward models have), both over the same paged KV cache.

The model returns final-normed hidden states; which rows make the output (last token, mean, CLS)
is the pooler's business (worker/pooler.py). Checkpoints saved from a bare decoder (`LlamaModel`)
name tensors without the `model.` prefix; the weight loader maps them. A `*ForCausalLM` directory
served as an embedding model (`--is-embedding`, like gte-Qwen2) keeps its unused lm_head out.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.kernels.attention import AttentionBackend
from pdserve.kernels.rotary_ref import rope_cos_sin_cache
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models.llama import LlamaModel
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup


class LlamaForPooling(nn.Module):
    """forward_hidden(batch, kv_pool, all_rows) -> final-normed hidden states;
    compute_scores(hidden) -> the score head's float32 logits (classification models only)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.attention = attention
        # Checkpoint tensors this model has no place for (weight_loader skips them).
        self.ignored_weights = ("lm_head.weight",) if config.has_lm_head else ()
        with torch.device("meta"):
            self.model = LlamaModel(config, attention, dtype, tp)  # the score head: replicated
            self.score = (
                nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=dtype)
                if config.num_labels > 0
                else None
            )
        self.to_empty(device=device)
        self.requires_grad_(False)
        cos_sin = rope_cos_sin_cache(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device,
        )
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)  # [max_pos, D] float32

    def forward_hidden(
        self, batch: ForwardBatch, kv_pool: KVPool, all_rows: bool = False
    ) -> torch.Tensor:  # [B, hidden] or [T, hidden], model dtype
        return self.model(batch, kv_pool, self.cos_sin_cache, all_rows)

    def compute_scores(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, L] f32
        if self.score is None:
            raise ValueError("this model has no score head (not a classification model)")
        return self.score(hidden).float()
