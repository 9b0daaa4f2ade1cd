"""Qwen2-VL and Qwen2.5-VL: a ViT over image patches (2-D rotary, 2x2 patch merger) whose outputs
replace the image placeholder tokens' embeddings, then the Qwen2 decoder of `llama.py` under M-RoPE.
Qwen2.5-VL's tower differs in its norms (RMSNorm), MLP (gated) and attention (within windows,
except a few blocks over the whole image); the rest is shared.

M-RoPE gives each token a (temporal, height, width) position (`multimodal/mrope.py`); the rotary
frequencies are split in three sections, each turned by one axis. Per step the model builds one
cos/sin row per new token (`MultimodalBatch.rope_positions`) and runs the decoder layers with that
table indexed by row, so the layers, KV cache and attention are the text model's. A token after
the prompt has equal positions on all three axes (`index + mrope_delta`): decode is plain RoPE at
an offset, and a decode worker needs nothing but the delta.

Parameter names are the published checkpoints' (`visual.*`, `model.*`, `lm_head`). The vision
tower runs on the prefill (or mixed) worker, once per image: encoded images are kept by hash
(`multimodal/encoder_cache.py`). A video is an image of several temporal patches (each frame
pair attends to itself in the tower) whose tokens are `video_token_id`; its M-RoPE temporal
positions step by 1 (Qwen2-VL) or tokens_per_second * seconds per pair (Qwen2.5-VL).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.config.vision_config import VisionConfig
from pdserve.kernels.attention import AttentionBackend
from pdserve.kernels.rotary_ref import rope_inv_freq
from pdserve.multimodal.encoder_cache import EncoderCache
from pdserve.multimodal.mrope import mrope_positions, time_intervals
from pdserve.scheduler.request import Request
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models.llama import LlamaForCausalLM, RMSNorm
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup

Tensor = torch.Tensor
_VISION_ROPE_THETA = 10000.0
_LN_EPS = 1e-6
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "silu": F.silu}


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=True, dtype=dtype)

    def forward(self, x: Tensor, seq_lens: list[int], cos: Tensor, sin: Tensor) -> Tensor:
        n = x.shape[0]  # x: [N, dim]; cos, sin: [N, head_dim] float32
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, d] each
        c, s = cos[:, None, :], sin[:, None, :]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
        outs = []  # each image attends only to itself (bidirectional)
        for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens)):
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)
            )  # [H, n_i, d]
            outs.append(o.transpose(0, 1).reshape(qi.shape[0], -1))
        return self.proj(torch.cat(outs))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, dtype=dtype)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedVisionMlp(nn.Module):
    """Qwen2.5-VL's: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, dtype=dtype)
        self.up_proj = nn.Linear(dim, hidden, dtype=dtype)
        self.down_proj = nn.Linear(hidden, dim, dtype=dtype)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(v: VisionConfig, dtype: torch.dtype) -> nn.Module:
    if v.kind == "qwen2_5_vl":
        return RMSNorm(v.embed_dim, _LN_EPS, dtype)
    return nn.LayerNorm(v.embed_dim, eps=_LN_EPS, dtype=dtype)


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm1 = _norm(v, dtype)
        self.norm2 = _norm(v, dtype)
        self.attn = VisionAttention(v.embed_dim, v.num_heads, dtype)
        mlp = GatedVisionMlp if v.kind == "qwen2_5_vl" else VisionMlp
        self.mlp = mlp(v.embed_dim, v.intermediate_size, v.hidden_act, dtype)

    def forward(self, x: Tensor, seq_lens: list[int], cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), seq_lens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, v: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(
            v.in_channels, v.embed_dim, kernel, stride=kernel, bias=False, dtype=dtype
        )

    def forward(self, pixels: Tensor) -> Tensor:  # [N, C*T*P*P] -> [N, embed_dim]
        # The kernel covers the whole patch: the convolution is one matmul per patch.
        weight = self.proj.weight  # [embed_dim, C, T, P, P]
        return pixels.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()


class PatchMerger(nn.Module):
    def __init__(self, v: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = v.embed_dim * v.spatial_merge_size**2
        self.ln_q = _norm(v, dtype)
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width, dtype=dtype),
            nn.GELU(),
            nn.Linear(self.width, v.out_hidden_size, dtype=dtype),
        )

    def forward(self, x: Tensor) -> Tensor:  # [N, embed] -> [N / m^2, out_hidden]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen2VisionTower(nn.Module):
    """pixels [N, C*T*P*P] of several images -> [N / m^2, out_hidden], image after image."""

    def __init__(self, v: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = v
        self.patch_embed = PatchEmbed(v, dtype)
        self.blocks = nn.ModuleList(VisionBlock(v, dtype) for _ in range(v.depth))
        self.merger = PatchMerger(v, dtype)

    def forward(self, pixels: Tensor, grids: list[list[int]]) -> Tensor:
        cos, sin = self._rotary(grids, pixels.device)
        seq_lens = [h * w for t, h, w in grids for _ in range(t)]  # each frame attends to itself
        x = self.patch_embed(pixels)
        v = self.config
        if v.kind != "qwen2_5_vl":
            for block in self.blocks:
                x = block(x, seq_lens, cos, sin)
            return self.merger(x)
        # Qwen2.5-VL: patches reordered window by window (in merge blocks), so that a window's
        # patches are contiguous; whole-image blocks attend over each frame as before.
        order, window_lens = _window_order(grids, v)
        unit = v.spatial_merge_size**2
        x, cos, sin = (_permute(t, order, unit) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            lens = seq_lens if i in v.fullatt_block_indexes else window_lens
            x = block(x, lens, cos, sin)
        return self.merger(x)[torch.argsort(order.to(x.device))]

    def _rotary(self, grids: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [N, head_dim] float32: half the frequencies turn with the patch's row, half
        with its column; patches are ordered by m x m merge block, as the processor lays them."""
        v = self.config
        head_dim = v.embed_dim // v.num_heads
        half = head_dim // 2
        inv_freq = 1.0 / (_VISION_ROPE_THETA ** (torch.arange(0, half, 2).float() / half))
        m = v.spatial_merge_size
        rows = []
        for t, h, w in grids:
            hpos = torch.arange(h)[:, None].expand(h, w)
            wpos = torch.arange(w)[None, :].expand(h, w)
            block = (h // m, m, w // m, m)
            hpos = hpos.reshape(block).transpose(1, 2).flatten()
            wpos = wpos.reshape(block).transpose(1, 2).flatten()
            rows.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        pos = torch.cat(rows).float()  # [N, 2]
        freqs = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)  # [N, d/2]
        emb = torch.cat([freqs, freqs], dim=-1).to(device)  # [N, d]
        return emb.cos(), emb.sin()


def _permute(x: Tensor, order: Tensor, unit: int) -> Tensor:
    """Rows of x ([N, D]) reordered by merge block: block order[i] becomes the i-th."""
    return x.view(-1, unit, x.shape[-1])[order.to(x.device)].reshape(x.shape)


def _window_order(grids: list[list[int]], v: VisionConfig) -> tuple[Tensor, list[int]]:
    """(the merge blocks in window order [N / m^2], the patches of each window): windows of
    window_size pixels tile each frame (the last row and column partly filled)."""
    m = v.spatial_merge_size
    side = v.window_size // m // v.patch_size  # a window's side in merge blocks
    order, lens, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r in range(0, gh, side):
                for c in range(0, gw, side):
                    window = index[f, r : r + side, c : c + side].reshape(-1)
                    order.append(window + base)
                    lens.append(window.numel() * m * m)
        base += t * gh * gw
    return torch.cat(order), lens


@dataclass
class MultimodalBatch:
    """What one step adds to the text batch: M-RoPE positions and the image rows' embeddings."""

    rope_positions: Tensor | None  # [3, T] int64, device (None: plain RoPE, LLaVA)
    embed_rows: Tensor | None = None  # [R] int64, device: rows of T that are image tokens
    embeds: Tensor | None = None  # [R, hidden] model dtype, device


@dataclass
class _RequestImages:
    """Request.mm_state: what the model derived from a request's images."""

    positions: np.ndarray  # [3, prompt_len] int64
    image_rows: np.ndarray  # [num_image_tokens] int64: prompt indices of image tokens
    embeds: Tensor | None = None  # [num_image_tokens, hidden], once encoded


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """The Qwen2 decoder plus `visual`; forward(batch, kv_pool) as LlamaForCausalLM's, with
    `batch.mm` (a MultimodalBatch from `multimodal_batch`) carrying what images add."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend,
        tp: TPGroup = SINGLE,
    ) -> None:
        if config.vision is None:
            raise ValueError(f"{config.architecture}: config.json has no vision_config")
        super().__init__(config, dtype, device, attention, tp)
        self.vision = config.vision
        with torch.device("meta"):
            self.visual = Qwen2VisionTower(config.vision, dtype)
        self.visual.to_empty(device=device)
        self.visual.requires_grad_(False)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("mrope_inv_freq", inv_freq.to(device), persistent=False)  # [D/2]
        section = torch.repeat_interleave(
            torch.arange(3), torch.tensor(config.vision.mrope_section)
        )  # [D/2]: the axis (t, h, w) that turns each frequency
        self.register_buffer("mrope_axis", section.to(device), persistent=False)
        self.encoder_cache = EncoderCache()

    # ------------------------------------------------------------------ per step, on the host

    def multimodal_batch(self, items: list, device: torch.device) -> MultimodalBatch:
        """The step's M-RoPE positions and image embeddings; `items`: the ScheduledBatch's."""
        positions, rows, embeds, offset = [], [], [], 0
        for it in items:
            req = it.req
            idx = np.arange(it.start, it.start + it.num_tokens, dtype=np.int64)
            if req.mm is None:
                positions.append(np.broadcast_to(idx, (3, len(idx))))
            else:
                state = self._request_images(req)
                prompt_len = len(req.prompt_ids)
                pos = np.broadcast_to(idx + req.mm.mrope_delta, (3, len(idx))).copy()
                in_prompt = idx < prompt_len
                pos[:, in_prompt] = state.positions[:, idx[in_prompt]]
                positions.append(pos)
                lo, hi = np.searchsorted(state.image_rows, [it.start, it.start + it.num_tokens])
                if hi > lo:
                    rows.append(state.image_rows[lo:hi] - it.start + offset)
                    embeds.append(self._image_embeds(req, state)[lo:hi])
                    if hi == len(state.image_rows):  # the last image rows: let them go
                        state.embeds = None
            offset += it.num_tokens
        rope = torch.from_numpy(np.concatenate(positions, axis=1)).to(device)
        if not rows:
            return MultimodalBatch(rope)
        embed_rows = torch.from_numpy(np.concatenate(rows)).to(device)
        return MultimodalBatch(rope, embed_rows, torch.cat(embeds))

    def _request_images(self, req: Request) -> _RequestImages:
        if req.mm_state is None:
            mm, v = req.mm, self.vision
            is_video = mm.is_video or [False] * len(mm.image_grid_thw)
            intervals = time_intervals(is_video, mm.second_per_grid_ts, v.tokens_per_second)
            found = mrope_positions(
                req.prompt_ids,
                mm.image_token_id,
                mm.image_grid_thw,
                v.spatial_merge_size,
                mm.video_token_id,
                intervals,
            )
            ids = np.asarray(req.prompt_ids, dtype=np.int64)
            rows = np.flatnonzero((ids == mm.image_token_id) | (ids == mm.video_token_id))
            req.mm_state = _RequestImages(found.positions, rows)
        return req.mm_state

    def _image_embeds(self, req: Request, state: _RequestImages) -> Tensor:
        """[num_image_tokens, hidden]: each image from the encoder cache or the vision tower."""
        if state.embeds is not None:
            return state.embeds
        mm = req.mm
        pixels = torch.frombuffer(bytearray(mm.pixel_values), dtype=_DTYPES[mm.pixel_dtype])
        pixels = pixels.view(mm.pixel_shape)  # [num_patches, C*T*P*P]
        starts = np.cumsum([0] + [t * h * w for t, h, w in mm.image_grid_thw])
        per_image: list[Tensor | None] = [self.encoder_cache.get(h) for h in mm.image_hashes]
        todo = [k for k, e in enumerate(per_image) if e is None]
        if todo:
            device = self.mrope_inv_freq.device
            batch = torch.cat([pixels[starts[k] : starts[k + 1]] for k in todo]).to(device)
            encoded = self.visual(batch, [mm.image_grid_thw[k] for k in todo])
            for k, e in zip(todo, encoded.split([mm.num_image_tokens[k] for k in todo])):
                per_image[k] = e
                self.encoder_cache.put(mm.image_hashes[k], e)
        state.embeds = torch.cat(per_image)  # type: ignore[arg-type]
        return state.embeds

    # ------------------------------------------------------------------ forward

    def forward_hidden(
        self, batch: ForwardBatch, kv_pool: KVPool, all_rows: bool = False
    ) -> torch.Tensor:
        """LlamaModel.forward with image rows merged into the embeddings and M-RoPE rotations."""
        model = self.model
        x = model.embed_tokens(batch.input_ids)  # [T, hidden]
        mm: MultimodalBatch | None = batch.mm
        if mm is None:  # text only: all three axes at the token's position
            rope_positions = batch.positions[None, :].expand(3, -1)
        else:
            rope_positions = mm.rope_positions
            if mm.embeds is not None:
                x = x.index_copy(0, mm.embed_rows, mm.embeds.to(x.dtype))
        # One cos/sin row per new token, indexed by row: the layers stay the text model's.
        axis_pos = rope_positions[self.mrope_axis]  # [D/2, T]
        freqs = axis_pos.t().float() * self.mrope_inv_freq  # [T, D/2]
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [T, D] float32
        rows = torch.arange(x.shape[0], device=x.device)
        rope_batch = dataclasses.replace(batch, positions=rows)
        residual = torch.zeros_like(x)
        for layer in model.layers:
            x, residual = layer(x, residual, rope_batch, kv_pool, cos_sin)
        if all_rows:
            x, _ = model.norm.add_and_norm(x, residual)
            return x
        x, _ = model.norm.add_and_norm(x[batch.logit_idx], residual[batch.logit_idx])
        return x
