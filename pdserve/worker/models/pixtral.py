"""Pixtral (`LlavaForConditionalGeneration` with a Pixtral tower): each image at its own resolution
through a ViT with 2-D RoPE (half the frequencies turned by the patch's row, half by its column),
RMSNorm and a gated MLP, each image attending only to itself; a 2-layer projector; the Mistral
decoder of `llama.py`. An image's features fill its `[IMG]` rows in patch order (`[IMG_BREAK]`
and `[IMG_END]` keep their own embeddings). Parameter names are the published checkpoints'.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.config.vision_config import PixtralVisionConfig
from pdserve.kernels.attention import AttentionBackend
from pdserve.worker.models.llama import RMSNorm
from pdserve.worker.models.llava_onevision import ImageRowsModel
from pdserve.worker.models.qwen2_vl import _ACTIVATIONS, _DTYPES, _rotate_half
from pdserve.worker.parallel.tp_group import SINGLE, TPGroup

Tensor = torch.Tensor
_EPS = 1e-5


class PixtralAttention(nn.Module):
    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        inner = v.num_heads * v.head_dim
        self.q_proj = nn.Linear(v.hidden_size, inner, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(v.hidden_size, inner, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(v.hidden_size, inner, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(inner, v.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: Tensor, seq_lens: list[int], cos: Tensor, sin: Tensor) -> Tensor:
        n = x.shape[0]  # x: [N, hidden]; cos, sin: [N, head_dim]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in
                   (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        outs = []  # each image attends only to itself
        for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens)):
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)
            )  # [H, n_i, d]
            outs.append(o.transpose(0, 1).reshape(qi.shape[0], -1))
        return self.o_proj(torch.cat(outs))


class PixtralMLP(nn.Module):
    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(v.hidden_size, v.intermediate_size, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(v.hidden_size, v.intermediate_size, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(v.intermediate_size, v.hidden_size, bias=False, dtype=dtype)
        self.act = _ACTIVATIONS[v.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(v.hidden_size, _EPS, dtype)
        self.attention = PixtralAttention(v, dtype)
        self.ffn_norm = RMSNorm(v.hidden_size, _EPS, dtype)
        self.feed_forward = PixtralMLP(v, dtype)

    def forward(self, x: Tensor, seq_lens: list[int], cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), seq_lens, cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixtralLayer(v, dtype) for _ in range(v.num_layers))


class PixtralVisionModel(nn.Module):
    """images (each [3, H, W]) -> their patches' states [sum of H W / P^2, hidden]."""

    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = v
        self.patch_conv = nn.Conv2d(
            3, v.hidden_size, v.patch_size, stride=v.patch_size, bias=False, dtype=dtype
        )
        self.ln_pre = RMSNorm(v.hidden_size, _EPS, dtype)
        self.transformer = PixtralTransformer(v, dtype)

    def forward(self, images: list[Tensor]) -> Tensor:
        weight = self.patch_conv.weight
        grids = [self.patch_conv(im.to(weight.dtype)[None])[0] for im in images]  # [D, h, w]
        x = self.ln_pre(torch.cat([g.flatten(1).t() for g in grids]))  # [N, D]
        cos, sin = self._rotary([tuple(g.shape[1:]) for g in grids], x.device)
        seq_lens = [g.shape[1] * g.shape[2] for g in grids]
        for layer in self.transformer.layers:
            x = layer(x, seq_lens, cos, sin)
        return x

    def _rotary(self, grids: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [N, head_dim]: even frequencies turned by the row, odd ones by the column."""
        d = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2).float() / d))  # [d/2]
        pos = torch.cat(
            [torch.cartesian_prod(torch.arange(h), torch.arange(w)) for h, w in grids]
        ).float()  # [N, 2]: (row, column), row-major
        freqs = torch.cat([pos[:, :1] * inv_freq[0::2], pos[:, 1:] * inv_freq[1::2]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1).to(device)  # [N, d]
        return emb.cos(), emb.sin()


class Mistral3Projector(nn.Module):
    """Mistral 3's projector: RMSNorm over the tower's features, each merge x merge block of an
    image's patch grid concatenated (channel-major, then the block's rows and columns: torch's
    unfold order) and merged by one linear layer, then the two layers of Pixtral's projector."""

    def __init__(self, v: PixtralVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        m, d = v.spatial_merge_size, v.hidden_size
        self.merge = m
        self.norm = RMSNorm(d, v.projector_norm_eps, dtype)
        self.patch_merger = nn.Module()
        self.patch_merger.merging_layer = nn.Linear(d * m * m, d, bias=False, dtype=dtype)
        self.linear_1 = nn.Linear(d, v.text_hidden_size, bias=v.projector_bias, dtype=dtype)
        self.linear_2 = nn.Linear(
            v.text_hidden_size, v.text_hidden_size, bias=v.projector_bias, dtype=dtype
        )
        self.act = _ACTIVATIONS[v.projector_act]

    def forward(self, x: Tensor, grids: list[tuple[int, int]]) -> Tensor:
        """x: [sum of h w, hidden], the images' patches row-major; grids: each image's (h, w)."""
        x = self.norm(x)
        merged = []
        for patches, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = patches.view(h, w, -1).permute(2, 0, 1)[None]  # [1, D, h, w]
            blocks = F.unfold(grid, kernel_size=self.merge, stride=self.merge)  # [1, D m m, L]
            merged.append(blocks[0].t())
        x = self.patch_merger.merging_layer(torch.cat(merged))
        return self.linear_2(self.act(self.linear_1(x)))


class PixtralForConditionalGeneration(ImageRowsModel):
    """`LlavaForConditionalGeneration` with a Pixtral tower, and Mistral 3 (the same tower, a
    patch-merging projector)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        attention: AttentionBackend,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self._build_llava(
            config, dtype, device, attention, tp, PixtralVisionConfig, PixtralVisionModel
        )
        v = self.vision
        if v.spatial_merge_size > 1:  # Mistral 3
            with torch.device("meta"):
                self.multi_modal_projector = Mistral3Projector(v, dtype)
            self.multi_modal_projector.to_empty(device=device)
        self.requires_grad_(False)

    def encode(self, mm: Any) -> list[Tensor]:
        pixels = torch.frombuffer(bytearray(mm.pixel_values), dtype=_DTYPES[mm.pixel_dtype])
        images, start = [], 0
        for h, w in mm.image_sizes:  # [3, H, W] each, flattened one after another
            images.append(pixels[start : start + 3 * h * w].view(3, h, w).to(self.device))
            start += 3 * h * w
        states = self.vision_tower(images)
        if isinstance(self.multi_modal_projector, Mistral3Projector):
            p = self.vision.patch_size
            grids = [(h // p, w // p) for h, w in mm.image_sizes]
            features = self.multi_modal_projector(states, grids)
        else:
            features = self.multi_modal_projector(states)
        return list(features.split(mm.num_image_tokens))
