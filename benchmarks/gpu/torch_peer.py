"""A gpt-fast-style Llama decoder in plain PyTorch: the compiled peer that pdserve's decode rows are
held against. Static KV cache, fused q/k/v and gate/up weights, GQA through scaled_dot_product_attention,
greedy argmax; the one-token decode step is compiled with torch.compile(mode="reduce-overhead",
fullgraph=True), so on a GPU it replays as a CUDA graph.

It loads the same safetensors a Hugging Face Llama directory holds (random_checkpoint.py's or a tiny
model's) and equals transformers' LlamaForCausalLM in float32 (tests/bench/test_torch_peer.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Tensor = torch.Tensor


@dataclass(frozen=True)
class PeerConfig:
    """The decoder's shape, read once from config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # llama3 scaling's fields, or None
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, model_dir: Path) -> PeerConfig:
        hf = json.loads((Path(model_dir) / "config.json").read_text())
        if hf.get("model_type") not in ("llama", None):
            raise ValueError(f"model_type={hf.get('model_type')!r}: the peer runs Llama only")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope_type={kind!r}: expected 'default' or 'llama3'")
        heads = hf["num_attention_heads"]
        return cls(
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if kind == "llama3" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def rope_inv_freq(cfg: PeerConfig) -> Tensor:  # [head_dim / 2] float32
    """Rotary frequencies; with llama3 scaling, long wavelengths are slowed by `factor` and the
    band between the two cut-offs is blended smoothly (Llama 3.1's recipe)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling is None:
        return inv_freq
    s = dict(cfg.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - blend) * scaled / factor + blend * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, smoothed, scaled)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, 1, D]. Rotates the two halves of each head (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """One decoder layer's weights (q/k/v and gate/up fused) and its forward over the static cache."""

    def __init__(self, cfg: PeerConfig, w: dict[str, Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        frozen = {"requires_grad": False}
        self.attn_norm = nn.Parameter(w["input_layernorm"], **frozen)
        self.mlp_norm = nn.Parameter(w["post_attention_layernorm"], **frozen)
        self.wqkv = nn.Parameter(torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), **frozen)
        self.wo = nn.Parameter(w["o_proj"], **frozen)
        self.w_gate_up = nn.Parameter(torch.cat([w["gate_proj"], w["up_proj"]]), **frozen)
        self.w_down = nn.Parameter(w["down_proj"], **frozen)

    def forward(
        self,
        x: Tensor,  # [B, S, hidden]
        rope: tuple[Tensor, Tensor],  # cos, sin: [B, S, 1, D], x's dtype
        positions: Tensor,  # [B, S] int64
        mask: Tensor,  # [B, 1, S * group, max_len] additive: 0 or -inf, x's dtype
        rows: tuple[int, Tensor],  # the cache rows of these sequences: first, and all [B, 1] int64
        k_cache: Tensor,  # [cache batch, Hkv, max_len, D]: this layer's, written in place
        v_cache: Tensor,
    ) -> Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        group = hq // hkv
        h = rms_norm(x, self.attn_norm, cfg.rms_norm_eps)
        q, k, v = F.linear(h, self.wqkv).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = rotate(q.view(b, s, hq, d), *rope) * d**-0.5  # scaled here: SDPA's scale is 1
        k = rotate(k.view(b, s, hkv, d), *rope)
        # An index_put on the layer's whole cache (a graph input of its own) stays in place under
        # torch.compile; a scatter into a view of one shared cache becomes a copy of all of it.
        first, row_ids = rows
        k_cache[row_ids, :, positions] = k  # [B, S, Hkv, D] into [rows, :, positions]
        v_cache[row_ids, :, positions] = v.view(b, s, hkv, d)
        k_seq, v_seq = k_cache[first : first + b], v_cache[first : first + b]  # views
        # GQA folded into the query length: the `group` query heads of a KV head attend as
        # group x S query rows of that head, so each KV head is read once and never repeated.
        qg = q.view(b, s, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, s * group, d)
        o = F.scaled_dot_product_attention(qg, k_seq, v_seq, attn_mask=mask, scale=1.0)
        o = o.view(b, hkv, s, group, d).permute(0, 2, 1, 3, 4).reshape(b, s, hq * d)
        x = x + F.linear(o, self.wo)
        h = rms_norm(x, self.mlp_norm, cfg.rms_norm_eps)
        gate, up = F.linear(h, self.w_gate_up).chunk(2, dim=-1)  # [B, S, inter] each
        return x + F.linear(F.silu(gate) * up, self.w_down)


class PeerModel(nn.Module):
    """Embedding, blocks, final norm and lm_head, plus the static KV cache they write."""

    def __init__(self, cfg: PeerConfig, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        frozen = {"requires_grad": False}
        self.embed = nn.Parameter(weights.pop("model.embed_tokens.weight"), **frozen)
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else nn.Parameter(weights.pop("lm_head.weight"), **frozen)
        )
        self.norm = nn.Parameter(weights.pop("model.norm.weight"), **frozen)
        self.blocks = nn.ModuleList()
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}."
            names = [n for n in weights if n.startswith(prefix)]
            layer = {n[len(prefix) :].split(".")[-2]: weights.pop(n) for n in names}
            self.blocks.append(Block(cfg, layer))
        device = self.embed.device
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
        # The [layers, B, Hkv, max_len, D] cache, one tensor per layer (as gpt-fast's KVCache):
        # each is its own graph input, which the step's index_put updates in place.
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []

    def setup_cache(self, batch: int, max_len: int) -> None:
        """A fresh static cache (zeros); a new shape recompiles the decode step."""
        cfg, p = self.cfg, self.embed
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache, self.v_cache = [], []  # free the old one first
        if p.is_cuda:
            torch.cuda.empty_cache()
        for _ in range(cfg.num_layers):
            for cache in (self.k_cache, self.v_cache):
                cache.append(torch.zeros(shape, dtype=p.dtype, device=p.device))
                # A static address: CUDA graphs write it in place, never copy it in or out.
                torch._dynamo.mark_static_address(cache[-1])

    def forward(
        self,
        token_ids: Tensor,
        positions: Tensor,
        last_only: bool = True,
        first_row: int = 0,
    ) -> Tensor:
        """token_ids, positions: [B, S] int64 -> logits [B, V] (last position) or [B, S, V].
        The B sequences own cache rows first_row .. first_row + B - 1."""
        if not self.k_cache:
            raise RuntimeError("call setup_cache(batch, max_len) before forward")
        cfg = self.cfg
        x = F.embedding(token_ids, self.embed)  # [B, S, hidden]
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, S, 1, D]
        rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        b, max_len = token_ids.shape[0], self.k_cache[0].shape[2]
        slots = torch.arange(max_len, device=token_ids.device)
        allowed = slots[None, None, :] <= positions[:, :, None]  # [B, S, max_len]
        group = cfg.num_heads // cfg.num_kv_heads
        allowed = allowed.repeat_interleave(group, dim=1)[:, None]  # [B, 1, S * group, max_len]
        # Additive, built once for every layer (SDPA would convert a bool mask in each call).
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed, float("-inf"))
        row_ids = torch.arange(first_row, first_row + b, device=x.device)[:, None]  # [B, 1]
        rows = (first_row, row_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, positions, mask, rows, self.k_cache[i], self.v_cache[i])
        if last_only:
            x = x[:, -1]
        return F.linear(rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head)


def load_weights(model_dir: Path, device: str | torch.device, dtype: torch.dtype) -> dict:
    """Every tensor of the checkpoint's safetensors files, on `device` in `dtype`."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    weights: dict[str, Tensor] = {}
    for file in files:
        for name, t in load_file(str(file), device=str(device)).items():
            weights[name] = t.to(dtype)
    return weights


class Generated(NamedTuple):
    token_ids: Tensor  # [B, num_new] int64, the first from prefill
    decode_logits: Tensor  # [B, num_new - 1, V] float32: the decode steps' logits


class TorchPeer:
    """The model, its cache, and the decode step: compiled on CUDA, eager when `compile` is off."""

    def __init__(
        self, model_dir: Path, device: str, dtype: torch.dtype, compile: bool = True
    ) -> None:
        self.model_dir = Path(model_dir)
        self.cfg = PeerConfig.from_dir(model_dir)
        self.device, self.dtype = torch.device(device), dtype
        with torch.no_grad():
            self.model = PeerModel(self.cfg, load_weights(model_dir, device, dtype)).eval()
        self.is_compiled = compile
        step: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = self._decode_step
        if compile:
            # Static shapes: each batch size compiles once (the static cache's address and shape
            # are baked into the CUDA graph anyway).
            step = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self._step = step

    def _decode_step(self, token_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """token_ids, positions: [B] -> (next token ids [B] int64, logits [B, V])."""
        logits = self.model(token_ids[:, None], positions[:, None])
        return logits.argmax(dim=-1), logits

    @property
    def cache_shape(self) -> tuple[int, int] | None:  # (batch, max_len) of the live cache
        k = self.model.k_cache
        return (k[0].shape[0], k[0].shape[2]) if k else None

    def ensure_cache(self, batch: int, max_len: int) -> None:
        """Keep the live cache when it already has this batch and room; else a new one."""
        shape = self.cache_shape
        if shape is None or shape[0] != batch or shape[1] < max_len:
            self.model.setup_cache(batch, -(-max_len // 64) * 64)

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor, max_tokens: int = 16384) -> Tensor:
        """prompt_ids: [B, S] int64, written at positions 0..S-1 -> first tokens [B]. Eager, in
        chunks of whole prompts of about `max_tokens` tokens (activations stay small)."""
        b, s = prompt_ids.shape
        per_chunk = max(1, max_tokens // s)
        positions = torch.arange(s, device=self.device).expand(per_chunk, s)
        first = []
        for start in range(0, b, per_chunk):
            ids = prompt_ids[start : start + per_chunk]
            logits = self.model(ids, positions[: ids.shape[0]], first_row=start)
            first.append(logits.argmax(dim=-1))
        return torch.cat(first)

    @torch.no_grad()
    def decode_steps(self, token_ids: Tensor, positions: Tensor, num_steps: int) -> Tensor:
        """`num_steps` greedy steps from token_ids at positions ([B] each, positions advanced in
        place) -> the last step's tokens [B]."""
        for _ in range(num_steps):
            token_ids = self.decode(token_ids, positions)[0]
            positions += 1
        return token_ids

    @torch.no_grad()
    def decode(self, token_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """One step; the ids are a copy (a CUDA graph overwrites its outputs on replay), the
        logits are not: copy them before the next step.

        SDPA's math backend, as gpt-fast decodes: chosen when the step is traced, it leaves plain
        matmuls and a softmax for inductor; the fused backends take a masked 4-row query poorly
        (cuDNN's ran the batch-64 step at 16x the roofline on an H200)."""
        with sdpa_kernel(SDPBackend.MATH):
            next_ids, logits = self._step(token_ids, positions)
        return next_ids.clone(), logits

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_new: int) -> Generated:
        """Greedy decoding of equal-length prompts; the cache must fit prompt + num_new."""
        prompts = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        b, s = prompts.shape
        self.ensure_cache(b, s + num_new)
        tokens = [self.prefill(prompts)]
        logits = []
        positions = torch.full((b,), s, dtype=torch.long, device=self.device)
        for _ in range(num_new - 1):
            next_ids, step_logits = self.decode(tokens[-1], positions)
            logits.append(step_logits.to(torch.float32, copy=True))  # before the next replay
            tokens.append(next_ids)
            positions += 1
        empty = torch.empty((b, 0, self.cfg.vocab_size), device=self.device)
        stacked = torch.stack(logits, dim=1) if logits else empty
        return Generated(torch.stack(tokens, dim=1), stacked)

    @torch.no_grad()
    def fill_cache_randomly(self, context_len: int, seed: int = 0) -> None:
        """Random K/V (as a prefill would leave, never zeros) in positions < context_len."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if not self.model.k_cache:
            raise RuntimeError("no cache: call ensure_cache first")
        for layer in self.model.k_cache + self.model.v_cache:
            layer[:, :, :context_len].normal_(generator=generator)


@torch.no_grad()
def reference_logits(peer: TorchPeer, token_ids: list[int]) -> Tensor:
    """float32 logits [S, V] of one sequence: the same checkpoint loaded in float32, one eager
    forward over the whole sequence through a fresh cache (no decode steps, no compile, no bf16)."""
    weights = load_weights(peer.model_dir, peer.device, torch.float32)
    ref = PeerModel(peer.cfg, weights).eval()
    ref.setup_cache(1, len(token_ids))
    ids = torch.tensor([token_ids], dtype=torch.long, device=peer.device)
    positions = torch.arange(len(token_ids), device=peer.device)[None]
    return ref(ids, positions, last_only=False)[0]
