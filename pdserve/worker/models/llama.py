"""The Llama-family decoder over a paged KV cache: Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3.

One module serves the family; ModelConfig's flags carry the differences: attention_bias (Qwen2:
biases on q/k/v), qk_norm (Qwen3: RMSNorm on each head of q and k before rope), rope_scaling
(Llama 3.1+) and tie_word_embeddings. Parameter names follow the Hugging Face checkpoints, except
q/k/v and gate/up, which are merged into one matmul each (see MergedColumnLinear).

Tensor parallelism (`tp`, worker/parallel/): each rank holds its share of the query heads, of the
KV heads (one replicated head when tp exceeds their count), of the MLP's intermediate rows and of
the vocab; o_proj and down_proj sum the ranks' partial outputs. With tp 1 it is the plain model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.kernels.activation_ref import silu_and_mul_ref
from pdserve.kernels.attention import AttentionBackend
from pdserve.kernels.attention_ref import NewToken
from pdserve.kernels.norm_ref import fused_add_rms_norm_ref, rms_norm_ref
from pdserve.kernels.rotary_ref import apply_rotary_ref, rope_cos_sin_cache
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.parallel.layers import (
    MergedColumnLinear,
    MergedPart,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pdserve.worker.parallel.tp_group import SINGLE, Shard, TPGroup

if TYPE_CHECKING:
    from pdserve.worker.lora.lora_layers import LoraBatch

Tensor = torch.Tensor


class Kernels(NamedTuple):
    """The elementwise/row kernels of a layer: torch references, or Triton kernels on CUDA."""

    rms_norm: Callable[[Tensor, Tensor, float], Tensor]  # (x, weight, eps)
    fused_add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    apply_rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    silu_and_mul: Callable[[Tensor], Tensor]  # [T, 2 I] -> [T, I]
    # Rotary on q and k plus the KV-cache store of k and v in one launch (returns q); None: the
    # two steps apart (apply_rotary, then the attention backend's store_kv).
    rotary_and_store: Callable[..., Tensor] | None = None


TORCH_KERNELS = Kernels(rms_norm_ref, fused_add_rms_norm_ref, apply_rotary_ref, silu_and_mul_ref)


@functools.cache
def select_kernels(use_triton: bool) -> Kernels:
    """Chosen once when the model is built (by the attention backend); triton imported only here."""
    if not use_triton:
        return TORCH_KERNELS
    from pdserve.kernels import triton_activation, triton_norm, triton_rotary

    def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # q/k heads sliced out of the fused qkv output cannot be viewed as rows: copy them (Qwen3).
        return triton_norm.rms_norm(x if x.is_contiguous() else x.contiguous(), weight, eps)

    return Kernels(
        rms_norm=rms_norm,
        fused_add_rms_norm=triton_norm.fused_add_rms_norm,
        apply_rotary=triton_rotary.apply_rotary_,  # in place on q and k
        silu_and_mul=triton_activation.silu_and_mul,
        rotary_and_store=triton_rotary.apply_rotary_and_store_,
    )


class RMSNorm(nn.Module):
    def __init__(
        self, dim: int, eps: float, dtype: torch.dtype, kernels: Kernels = TORCH_KERNELS
    ) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new residual)
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        attention: AttentionBackend,
        dtype: torch.dtype,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = attention
        self.kernels = kernels = select_kernels(attention.use_triton_kernels)
        d = config.head_dim
        q_heads = tp.split(config.num_heads, "num_attention_heads")
        kv_heads = tp.kv_heads(config.num_kv_heads)
        self.num_heads = q_heads.size  # this rank's
        self.num_kv_heads = kv_heads.size  # this rank's
        self.head_dim = d
        self.scale = d**-0.5
        q_size, kv_size = q_heads.size * d, kv_heads.size * d
        q_part = MergedPart(config.num_heads * d, Shard(q_heads.start * d, q_size))
        kv_part = MergedPart(config.num_kv_heads * d, Shard(kv_heads.start * d, kv_size))
        self.qkv_proj = MergedColumnLinear(
            config.hidden_size,
            {"q_proj": q_part, "k_proj": kv_part, "v_proj": kv_part},
            bias=config.attention_bias,
            dtype=dtype,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * d, config.hidden_size, bias=config.o_proj_bias, dtype=dtype, tp=tp
        )
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all heads
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, kernels)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype, kernels)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,  # [max_positions, D] float32
    ) -> torch.Tensor:  # [T, hidden]
        q = self.project_qkv(x, batch, kv_pool, cos_sin_cache)
        return self.project_out(self.attend(q, batch, kv_pool), batch.lora)

    def project_qkv(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,  # [max_positions, D] float32
    ) -> torch.Tensor:  # q [T, Hq, D], rotated; the new tokens' K and V stored in the cache
        q, k, v = self.project(x, batch)
        k_cache, v_cache = kv_pool.k(self.layer_idx), kv_pool.v(self.layer_idx)
        rotary_and_store = self.kernels.rotary_and_store
        if rotary_and_store is not None:
            return rotary_and_store(
                q, k, v, batch.positions, cos_sin_cache, k_cache, v_cache, batch.slots
            )
        q, k = self.kernels.apply_rotary(q, k, batch.positions, cos_sin_cache)
        self.attention.store_kv(k_cache, v_cache, batch.slots, k, v)
        return q

    def project(
        self, x: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [T, Hq, D], k, v [T, Hkv, D]
        """The q/k/v projection (with the batch's adapters, and Qwen3's q/k norms); no rotary."""
        num_tokens = x.shape[0]
        if batch.lora is None:
            qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        else:  # with the adapters' deltas on the q/k/v columns (rows may be strided)
            qkv = batch.lora.linear(self.layer_idx, "qkv_proj", self.qkv_proj, x)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def decode_new_tokens(
        self,
        x: torch.Tensor,  # [B, hidden]: one new token per sequence
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,  # [max_positions, D] float32
    ) -> torch.Tensor:  # [B, Hq D]
        """A decode batch's attention in one backend call that also does the rotary and the new
        tokens' KV store (one launch on the Triton backend; `decode_takes_new_token`)."""
        q, k, v = self.project(x, batch)
        new = NewToken(k, v, batch.positions, batch.slots, cos_sin_cache)
        k_cache, v_cache = kv_pool.k(self.layer_idx), kv_pool.v(self.layer_idx)
        out = self.attention.decode_attention(q, k_cache, v_cache, batch, self.scale, new=new)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        batch: ForwardBatch,
        kv_pool: KVPool,
        out: torch.Tensor | None = None,  # [T, Hq, D]: where to write the result
    ) -> torch.Tensor:  # [T, Hq D]
        k_cache, v_cache = kv_pool.k(self.layer_idx), kv_pool.v(self.layer_idx)
        if batch.is_decode:
            attend = self.attention.decode_attention
        else:
            attend = self.attention.extend_attention
        out = attend(q, k_cache, v_cache, batch, self.scale, out=out)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)  # [T, Hq D]

    def project_out(
        self, out: torch.Tensor, lora: LoraBatch | None = None
    ) -> torch.Tensor:  # [T, Hq D] -> [T, hidden]
        if lora is None:
            return self.o_proj(out)
        return lora.linear(self.layer_idx, "o_proj", self.o_proj, out)


class LlamaMLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        kernels: Kernels = TORCH_KERNELS,
        layer_idx: int = 0,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.kernels = kernels
        self.layer_idx = layer_idx
        inter = config.intermediate_size
        part = MergedPart(inter, tp.split(inter, "intermediate_size"))
        self.gate_up_proj = MergedColumnLinear(
            config.hidden_size, {"gate_proj": part, "up_proj": part}, bias=False, dtype=dtype
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, False, dtype, tp)

    def forward(
        self, x: torch.Tensor, lora: LoraBatch | None = None
    ) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if lora is None:
            return self.down_proj(
                self.kernels.silu_and_mul(self.gate_up_proj(x))
            )  # [T, 2I]->[T, I]
        gate_up = lora.linear(self.layer_idx, "gate_up_proj", self.gate_up_proj, x)  # [T, 2I]
        act = self.kernels.silu_and_mul(gate_up)  # [T, I]
        return lora.linear(self.layer_idx, "down_proj", self.down_proj, act)  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        attention: AttentionBackend,
        dtype: torch.dtype,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        kernels = select_kernels(attention.use_triton_kernels)
        self.self_attn = LlamaAttention(config, layer_idx, attention, dtype, tp)
        self.mlp = LlamaMLP(config, dtype, kernels, layer_idx, tp)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, kernels)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous sublayer's output (the embeddings at layer 0)
        residual: torch.Tensor,  # [T, hidden]: the stream x is still to be added to
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (mlp output, residual stream without it)
        attn = self.self_attn
        if batch.is_decode and attn.attention.decode_takes_new_token:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
            out = attn.decode_new_tokens(x, batch, kv_pool, cos_sin_cache)
        else:
            q, residual = self.before_attention(x, residual, batch, kv_pool, cos_sin_cache)
            out = attn.attend(q, batch, kv_pool)
        return self.after_attention(out, residual, batch.lora)

    # The layer's two halves around its attention call: the piecewise CUDA graphs capture them
    # apart (worker/piecewise_graphs.py). Each residual add is deferred into the next norm so the
    # two run as one fused kernel.

    def before_attention(
        self,
        x: torch.Tensor,  # [T, hidden]: the previous sublayer's output (the embeddings at layer 0)
        residual: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (q [T, Hq, D], residual stream with x added)
        x, residual = self.input_layernorm.add_and_norm(x, residual)
        return self.self_attn.project_qkv(x, batch, kv_pool, cos_sin_cache), residual

    def after_attention(
        self,
        out: torch.Tensor,  # [T, Hq D]: the attention's output
        residual: torch.Tensor,  # [T, hidden]
        lora: LoraBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (mlp output, residual stream without it)
        x, residual = self.post_attention_layernorm.add_and_norm(
            self.self_attn.project_out(out, lora), residual
        )
        return self.mlp(x, lora), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attention: AttentionBackend,
        dtype: torch.dtype,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attention, dtype, tp) for i in range(config.num_layers)
        )
        kernels = select_kernels(attention.use_triton_kernels)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels)

    def forward(
        self,
        batch: ForwardBatch,
        kv_pool: KVPool,
        cos_sin_cache: torch.Tensor,
        all_rows: bool = False,
    ) -> torch.Tensor:  # [B, hidden] at batch.logit_idx, or [T, hidden] with all_rows
        x = self.embed_tokens(batch.input_ids)  # [T, hidden]
        residual = torch.zeros_like(x)  # [T, hidden]: layer 0's "add" is then a plain copy
        for layer in self.layers:
            x, residual = layer(x, residual, batch, kv_pool, cos_sin_cache)
        if all_rows:  # hidden states, prompt logprobs, pooling: every new token is read out
            x, _ = self.norm.add_and_norm(x, residual)
            return x
        # Only the last new token of each sequence is read out, so only those rows are normed.
        x, _ = self.norm.add_and_norm(x[batch.logit_idx], residual[batch.logit_idx])
        return x


class LlamaForCausalLM(nn.Module):
    """forward(batch, kv_pool) -> [B, vocab] float32 logits of each sequence's last new token.

    Parameters are allocated but not initialised: load_weights must fill every one of them.
    """

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
        self.attention = attention  # the CUDA graph runner asks it whether decode is capturable
        with torch.device("meta"):  # no memory and no random init until to_empty below
            self.model = LlamaModel(config, attention, dtype, tp)
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, tp)
        self.to_empty(device=device)
        if config.tie_word_embeddings:  # after to_empty, which would untie them
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)
        # float32 whatever the model dtype; a buffer, so .to(device) moves it (never .to(dtype)).
        cos_sin = rope_cos_sin_cache(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            device,
        )
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)  # [max_pos, D] float32

    def forward(self, batch: ForwardBatch, kv_pool: KVPool) -> torch.Tensor:  # [B, vocab] float32
        return self.compute_logits(self.forward_hidden(batch, kv_pool))

    def forward_hidden(
        self, batch: ForwardBatch, kv_pool: KVPool, all_rows: bool = False
    ) -> torch.Tensor:
        """The final-normed hidden states in the model dtype: [B, hidden] at batch.logit_idx, or
        [T, hidden] for every new token with all_rows."""
        return self.model(batch, kv_pool, self.cos_sin_cache, all_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] f32
        """The full vocab's logits on every rank (tp > 1: an all-gather, so all ranks call it)."""
        return self.lm_head.compute_logits(hidden).float()
