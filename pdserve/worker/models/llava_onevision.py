"""LLaVA-OneVision (SigLIP tower, Qwen2 decoder) and LLaVA-NeXT (CLIP tower, Llama or Mistral
decoder): a vision tower over square tiles, a 2-layer projector, and the decoder of `llama.py`
(plain RoPE) whose image placeholder rows take the tiles' features.

One image is its base tile's features, then its other tiles' features laid out as the image
(padding cut off, shrunk beyond `max_num_tiles` tiles) with `image_newline` closing each row;
several OneVision images take their base tile and one newline each (`multimodal/llava_processing.py`
counts the same tokens). A OneVision video is its frames' features, each pooled to half its side,
and one newline (`multimodal/video_processing.py` counts them). Parameter names are the published checkpoints' (`vision_tower.*`,
`multi_modal_projector.*`, `image_newline`, `language_model.*`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.config.vision_config import LlavaVisionConfig
from pdserve.kernels.attention import AttentionBackend
from pdserve.multimodal.encoder_cache import EncoderCache
from pdserve.multimodal.llava_processing import tile_grid, unpadded_shape
from pdserve.scheduler.request import Request
from pdserve.worker.forward_batch import ForwardBatch
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.models.llama import LlamaForCausalLM
from pdserve.worker.models.qwen2_vl import _ACTIVATIONS, _DTYPES, MultimodalBatch
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup

Tensor = torch.Tensor
_ACTS = {**_ACTIVATIONS, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class SiglipEmbeddings(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            3, v.hidden_size, v.patch_size, stride=v.patch_size, dtype=dtype
        )
        num_patches = (v.image_size // v.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, v.hidden_size, dtype=dtype)

    def forward(self, tiles: Tensor) -> Tensor:  # [N, 3, S, S] -> [N, (S/P)^2, D]
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class ClipEmbeddings(nn.Module):
    """CLIP's: a class (CLS) position first, then the patches; no bias on the patch conv."""

    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            3, v.hidden_size, v.patch_size, stride=v.patch_size, bias=False, dtype=dtype
        )
        self.class_embedding = nn.Parameter(torch.empty(v.hidden_size, dtype=dtype))
        num_positions = (v.image_size // v.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, v.hidden_size, dtype=dtype)

    def forward(self, tiles: Tensor) -> Tensor:  # [N, 3, S, S] -> [N, 1 + (S/P)^2, D]
        x = self.patch_embedding(tiles.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = v.num_heads
        d = v.hidden_size
        self.q_proj = nn.Linear(d, d, dtype=dtype)
        self.k_proj = nn.Linear(d, d, dtype=dtype)
        self.v_proj = nn.Linear(d, d, dtype=dtype)
        self.out_proj = nn.Linear(d, d, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:  # [N, L, D]
        n, length, d = x.shape
        q, k, v = (p(x).view(n, length, self.num_heads, -1).transpose(1, 2) for p in
                   (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, d]: every patch sees the tile
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d))


class SiglipMLP(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size, dtype=dtype)
        self.act = _ACTS[v.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=dtype)
        self.self_attn = SiglipAttention(v, dtype)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=dtype)
        self.mlp = SiglipMLP(v, dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(v, dtype) for _ in range(v.num_layers))


class SiglipVisionModel(nn.Module):
    """tiles [N, 3, S, S] -> the hidden state `feature_layer` picks: [N, L, D]. SigLIP's, or
    CLIP's (`tower` "clip": a CLS position and a LayerNorm before the layers)."""

    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.is_clip = v.tower == "clip"
        if self.is_clip:
            self.embeddings: nn.Module = ClipEmbeddings(v, dtype)
            eps = v.layer_norm_eps
            self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=eps, dtype=dtype)  # CLIP's name
        else:
            self.embeddings = SiglipEmbeddings(v, dtype)
        self.encoder = SiglipEncoder(v, dtype)
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=dtype)
        # hidden_states[feature_layer] of transformers' list (embeddings first): layers to run
        self.num_layers_run = v.num_layers + 1 + v.feature_layer

    def forward(self, tiles: Tensor) -> Tensor:
        x = self.embeddings(tiles)
        if self.is_clip:
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers[: self.num_layers_run]:
            x = layer(x)
        return x  # the projector reads a layer's output: post_layernorm is not applied


class VisionTower(nn.Module):
    def __init__(self, v: LlavaVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(v, dtype)


class Projector(nn.Module):
    """The two-layer projector from tower features to the decoder's hidden size (LLaVA, Pixtral);
    `v`: a LlavaVisionConfig or PixtralVisionConfig."""

    def __init__(self, v: Any, dtype: torch.dtype) -> None:
        super().__init__()
        d = v.text_hidden_size
        self.linear_1 = nn.Linear(v.hidden_size, d, bias=v.projector_bias, dtype=dtype)
        self.linear_2 = nn.Linear(d, d, bias=v.projector_bias, dtype=dtype)
        self.act = _ACTS[v.projector_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageRowsModel(nn.Module):
    """A decoder (`language_model`, LlamaForCausalLM) whose image placeholder rows take the
    features `encode` gives; forward(batch, kv_pool) as LlamaForCausalLM's, with `batch.mm` (a
    MultimodalBatch from `multimodal_batch`) carrying the rows' features. Subclasses set
    `language_model`, `encoder_cache` and `device` and implement `encode`."""

    language_model: LlamaForCausalLM
    encoder_cache: EncoderCache
    device: torch.device

    def encode(self, mm: Any) -> list[Tensor]:
        """Each image's features [its placeholder tokens, hidden]; `mm`: MultimodalInputs."""
        raise NotImplementedError

    def _build_llava(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend,
        tp: TPGroup,
        vision_type: type,
        make_tower: Any,
    ) -> None:
        """The parts every LLaVA-style model has: the decoder, `make_tower(v, dtype)` and the
        projector (allocated, filled by the weight loader), the encoder cache."""
        if not isinstance(config.vision, vision_type):
            raise ValueError(f"{config.architecture}: expected a {vision_type.__name__}")
        self.config = config
        self.tp = tp
        self.attention = attention
        self.vision = v = config.vision
        self.language_model = LlamaForCausalLM(config, dtype, device, attention, tp)
        with torch.device("meta"):
            self.vision_tower = make_tower(v, dtype)
            self.multi_modal_projector = Projector(v, dtype)
        self.vision_tower.to_empty(device=device)
        self.multi_modal_projector.to_empty(device=device)
        self.encoder_cache = EncoderCache()
        self.device = torch.device(device)

    def _image_embeds(self, req: Request) -> Tensor:
        """[num_image_tokens, hidden] of req's images, from the encoder cache or `encode`."""
        mm = req.mm
        if req.mm_state is not None:
            return req.mm_state
        per_image = [self.encoder_cache.get(h) for h in mm.image_hashes]
        if any(e is None for e in per_image):
            per_image = self.encode(mm)
            for h, e in zip(mm.image_hashes, per_image):
                self.encoder_cache.put(h, e)
        req.mm_state = torch.cat(per_image)
        return req.mm_state

    def multimodal_batch(self, items: list, device: torch.device) -> MultimodalBatch:
        """The step's image rows and their features; `items`: the ScheduledBatch's."""
        rows, embeds, offset = [], [], 0
        for it in items:
            req = it.req
            if req.mm is not None and it.start < len(req.prompt_ids):
                ids = np.asarray(req.prompt_ids, dtype=np.int64)
                is_item = (ids == req.mm.image_token_id) | (ids == req.mm.video_token_id)
                image_rows = np.flatnonzero(is_item)
                lo, hi = np.searchsorted(image_rows, [it.start, it.start + it.num_tokens])
                if hi > lo:
                    rows.append(image_rows[lo:hi] - it.start + offset)
                    embeds.append(self._image_embeds(req)[lo:hi])
                    if hi == len(image_rows):  # the last image rows: let the features go
                        req.mm_state = None
            offset += it.num_tokens
        if not rows:
            return MultimodalBatch(None)
        embed_rows = torch.from_numpy(np.concatenate(rows)).to(device)
        return MultimodalBatch(None, embed_rows, torch.cat(embeds))

    def forward(self, batch: ForwardBatch, kv_pool: KVPool) -> Tensor:  # [B, vocab] float32
        return self.compute_logits(self.forward_hidden(batch, kv_pool))

    def forward_hidden(
        self, batch: ForwardBatch, kv_pool: KVPool, all_rows: bool = False
    ) -> Tensor:
        lm = self.language_model
        x = lm.model.embed_tokens(batch.input_ids)  # [T, hidden]
        mm: MultimodalBatch | None = batch.mm
        if mm is not None and mm.embeds is not None:
            x = x.index_copy(0, mm.embed_rows, mm.embeds.to(x.dtype))
        residual = torch.zeros_like(x)
        for layer in lm.model.layers:
            x, residual = layer(x, residual, batch, kv_pool, lm.cos_sin_cache)
        if all_rows:
            x, _ = lm.model.norm.add_and_norm(x, residual)
            return x
        x, _ = lm.model.norm.add_and_norm(x[batch.logit_idx], residual[batch.logit_idx])
        return x

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.language_model.compute_logits(hidden)


class LlavaOnevisionForConditionalGeneration(ImageRowsModel):
    """LLaVA-OneVision and LLaVA-NeXT: tiles through the tower, packed as the image."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self._build_llava(config, dtype, device, attention, tp, LlavaVisionConfig, VisionTower)
        newline = torch.empty(self.vision.text_hidden_size, dtype=dtype, device=device)
        self.image_newline = nn.Parameter(newline)  # [hidden]: closes each row of tiles
        self.requires_grad_(False)

    # ------------------------------------------------------------------ images

    def encode_images(
        self,
        tiles: Tensor,
        sizes: list[list[int]],
        counts: list[int],
        is_video: list[bool] | None = None,
    ) -> list[Tensor]:
        """Each item's features [its placeholder tokens, hidden]; tiles [sum(counts), 3, S, S]:
        an image's tiles, or a video's frames (`is_video`)."""
        is_video = is_video or [False] * len(counts)
        features = self.vision_tower.vision_model(tiles)
        if self.vision.drop_first_feature:
            features = features[:, 1:]
        features = self.multi_modal_projector(features)  # [N, L, hidden]
        num_images = sum(1 for video in is_video if not video)
        is_multi = num_images > 1 and self.vision.single_tile_when_several
        return [
            self._pool_frames(f) if video else self._pack(f, (size[0], size[1]), is_multi)
            for f, size, video in zip(features.split(counts), sizes, is_video)
        ]

    def _pool_frames(self, frames: Tensor) -> Tensor:
        """A video's frame features [F, L, hidden], each pooled bilinearly to half its side,
        then one newline: [F * ceil(side / 2)^2 + 1, hidden] (transformers' apply_pooling)."""
        side = self.vision.image_size // self.vision.patch_size
        x = frames.view(frames.shape[0], side, side, -1).permute(0, 3, 1, 2)  # [F, hidden, s, s]
        x = F.interpolate(x, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        x = x.permute(0, 2, 3, 1).reshape(-1, frames.shape[-1])
        return torch.cat([x, self.image_newline.to(x.dtype)[None]])

    def _pack(self, tiles: Tensor, size: tuple[int, int], is_multi: bool) -> Tensor:
        """One image's tile features [n, L, hidden] as its placeholder rows."""
        newline = self.image_newline.to(tiles.dtype)
        if is_multi or tiles.shape[0] == 1:
            return torch.cat([tiles[0], newline[None]])
        v = self.vision
        side = v.image_size // v.patch_size
        rows, cols = tile_grid(size, v)
        grid = tiles[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
        grid = grid.reshape(grid.shape[0], rows * side, cols * side)  # [hidden, H, W]
        height, width = unpadded_shape(size, rows * side, cols * side)
        top, left = (rows * side - height) // 2, (cols * side - width) // 2
        grid = grid[:, top : top + height, left : left + width]
        ratio = (height * width / (max(v.max_num_tiles, 1) * side * side)) ** 0.5
        if v.max_num_tiles and ratio > 1.1:
            shape = [int(height // ratio), int(width // ratio)]
            grid = F.interpolate(grid[None], shape, mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=-1)
        return torch.cat([tiles[0], grid.flatten(1, 2).t()])

    def encode(self, mm: Any) -> list[Tensor]:
        pixels = torch.frombuffer(bytearray(mm.pixel_values), dtype=_DTYPES[mm.pixel_dtype])
        tiles = pixels.view(mm.pixel_shape).to(self.device)  # [tiles, 3, S, S]
        return self.encode_images(tiles, mm.image_sizes, mm.num_image_patches, mm.is_video)
