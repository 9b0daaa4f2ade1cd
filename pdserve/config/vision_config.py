"""A vision-language checkpoint's vision side, read once from config.json (Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision).

`split_vlm_config` turns a VLM's config.json into the decoder's flat dict (which `ModelConfig`
reads as for any Qwen2 model) plus a frozen `VisionConfig`; published checkpoints are flat,
transformers >= 5 saves the decoder under `text_config`: both are read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

# Vision-language architectures -> the decoder family their language part is.
VLM_ARCHITECTURES: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": "Qwen2",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2",
    "LlavaOnevisionForConditionalGeneration": "Qwen2",
    "LlavaNextForConditionalGeneration": "Llama",  # Llama or Mistral decoders
    "LlavaForConditionalGeneration": "Llama",  # Pixtral: a Pixtral tower, a Mistral decoder
    "Mistral3ForConditionalGeneration": "Llama",  # a Pixtral tower, a patch merger, Mistral
}
_LLAVA_TEXT_TYPES = {
    "LlavaOnevisionForConditionalGeneration": ("qwen2",),
    "LlavaNextForConditionalGeneration": ("llama", "mistral", "qwen2"),
}
VisionKind = Literal["qwen2_vl", "qwen2_5_vl"]


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape and the token ids that stand for image patches.

    qwen2_vl: LayerNorm and a GELU MLP (fc1, fc2), every block attends over the whole image;
    qwen2_5_vl: RMSNorm and a gated MLP (gate/up/down), blocks attend within windows of
    `window_size` pixels except those in `fullatt_block_indexes`."""

    kind: VisionKind
    depth: int
    embed_dim: int
    num_heads: int
    intermediate_size: int  # the MLP's hidden width
    hidden_act: str
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int  # the merger's output: the decoder's hidden size
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    mrope_section: tuple[int, ...]  # rotary frequencies given to (temporal, height, width)
    window_size: int = 0  # qwen2_5_vl: a window's side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()  # qwen2_5_vl: blocks attending to whole images
    tokens_per_second: float = 0.0  # qwen2_5_vl: video time positions; 0: one per frame pair

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"vision_config.embed_dim={self.embed_dim} is invalid: expected a multiple of "
                f"num_heads={self.num_heads}"
            )
        if len(self.mrope_section) != 3:
            raise ValueError(
                f"rope_scaling.mrope_section={list(self.mrope_section)} is invalid: expected 3 "
                "sizes (temporal, height, width)"
            )


@dataclass(frozen=True)
class LlavaVisionConfig:
    """LLaVA-OneVision (a SigLIP tower) and LLaVA-NeXT (a CLIP tower): a 2-layer projector, and
    images tiled at the resolution of `grid_pinpoints` that fits best; OneVision gives each of
    several images a single square tile and shrinks features beyond `max_num_tiles` tiles."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # a tile's side in pixels
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    image_token_id: int
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) tilings
    max_num_tiles: int  # vision_aspect_ratio "anyres_max_N": features shrunk beyond N; 0: never
    feature_layer: int  # the tower's hidden state the projector reads (-1: the last layer's)
    drop_first_feature: bool  # vision_feature_select_strategy "default": drop the CLS position
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    tower: str = "siglip"  # "siglip" (OneVision) or "clip" (NeXT: a CLS position, pre-norm)
    single_tile_when_several: bool = True  # OneVision: several images take one tile each
    video_token_id: int = -1  # OneVision: a video's frames (pooled); -1: no video

    def __post_init__(self) -> None:
        if not -self.num_layers - 1 <= self.feature_layer < 0:
            raise ValueError(
                f"vision_feature_layer={self.feature_layer} is not supported: expected a negative "
                f"layer index in [-{self.num_layers + 1}, -1]"
            )


def _llava_config(hf: dict[str, Any]) -> tuple[dict[str, Any], LlavaVisionConfig]:
    arch = hf["architectures"][0]
    text = {**hf, **hf["text_config"], "architectures": hf["architectures"]}
    if text.get("model_type") not in _LLAVA_TEXT_TYPES[arch]:
        raise ValueError(
            f"text_config.model_type={text.get('model_type')!r} is not supported for {arch}: "
            f"expected one of {list(_LLAVA_TEXT_TYPES[arch])}"
        )
    is_next = arch == "LlavaNextForConditionalGeneration"
    text.setdefault("attention_bias", text["model_type"] == "qwen2")  # Qwen2: q, k, v biases
    v = hf["vision_config"]
    tower = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}.get(v.get("model_type"))
    if tower is None:
        raise ValueError(
            f"vision_config.model_type={v.get('model_type')!r} is not supported: expected "
            "'siglip_vision_model' or 'clip_vision_model'"
        )
    ratio = "anyres_max_0" if is_next else str(hf.get("vision_aspect_ratio", "anyres_max_9"))
    if not ratio.startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio={ratio!r} is not supported: expected anyres_max_N")
    strategy = hf.get("vision_feature_select_strategy", "default" if is_next else "full")
    if strategy not in ("full", "default"):
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} is invalid: expected 'full' or 'default'"
        )
    vision = LlavaVisionConfig(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5 if tower == "clip" else 1e-6)),
        hidden_act=str(
            v.get("hidden_act", "quick_gelu" if tower == "clip" else "gelu_pytorch_tanh")
        ),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 0))),
        grid_pinpoints=tuple((int(h), int(w)) for h, w in hf["image_grid_pinpoints"]),
        max_num_tiles=int(ratio.removeprefix("anyres_max_")),
        feature_layer=int(hf.get("vision_feature_layer", -1)),
        drop_first_feature=strategy == "default",
        projector_act=str(hf.get("projector_hidden_act", "gelu")),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        text_hidden_size=int(text["hidden_size"]),
        tower=tower,
        single_tile_when_several=not is_next,
        video_token_id=-1 if is_next else int(hf.get("video_token_index", -1)),
    )
    return text, vision


@dataclass(frozen=True)
class PixtralVisionConfig:
    """Pixtral (`LlavaForConditionalGeneration` with a Pixtral tower): each image at its own
    resolution, 2-D RoPE over its patches, `[IMG_BREAK]` after each row and `[IMG_END]` last."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    patch_size: int
    rope_theta: float
    hidden_act: str
    image_token_id: int
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    kind: str = "pixtral"
    # Mistral 3: the projector normalizes the tower's features (RMSNorm, this eps) and merges
    # each merge x merge block of patches into one token before its two layers; 1: Pixtral's.
    spatial_merge_size: int = 1
    projector_norm_eps: float = 0.0

    @property
    def token_patch_size(self) -> int:
        """Pixels a side of what one image token covers."""
        return self.patch_size * self.spatial_merge_size


def _pixtral_config(hf: dict[str, Any]) -> tuple[dict[str, Any], PixtralVisionConfig]:
    text = {**hf, **hf["text_config"], "architectures": hf["architectures"]}
    if text.get("model_type") not in ("mistral", "llama"):
        raise ValueError(
            f"text_config.model_type={text.get('model_type')!r} is not supported for Pixtral: "
            "expected 'mistral' or 'llama'"
        )
    v = hf["vision_config"]
    if hf.get("vision_feature_layer", -1) != -1 or hf.get("vision_feature_select_strategy") not in (
        None,
        "full",
    ):
        raise ValueError(
            "Pixtral: vision_feature_layer -1 and vision_feature_select_strategy 'full' are "
            f"supported, got {hf.get('vision_feature_layer')!r} and "
            f"{hf.get('vision_feature_select_strategy')!r}"
        )
    rope = v.get("rope_parameters") or {}
    vision = PixtralVisionConfig(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        head_dim=int(v.get("head_dim") or v["hidden_size"] // v["num_attention_heads"]),
        patch_size=int(v["patch_size"]),
        rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
        hidden_act=str(v.get("hidden_act", "silu")),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 10))),
        projector_act=str(hf.get("projector_hidden_act", "gelu")),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
        text_hidden_size=int(text["hidden_size"]),
    )
    if hf["architectures"][0] == "Mistral3ForConditionalGeneration":
        merge = int(hf.get("spatial_merge_size", 2))
        if merge < 1:
            raise ValueError(f"spatial_merge_size={merge!r} is invalid: expected >= 1")
        eps = float(text.get("rms_norm_eps", 1e-5))
        vision = dataclasses.replace(vision, spatial_merge_size=merge, projector_norm_eps=eps)
    return text, vision


def split_vlm_config(
    hf: dict[str, Any],
) -> tuple[dict[str, Any], VisionConfig | LlavaVisionConfig | PixtralVisionConfig | None]:
    """(the decoder's flat config, the vision config); (hf, None) for a text-only model."""
    archs = hf.get("architectures") or []
    if not archs or archs[0] not in VLM_ARCHITECTURES:
        return hf, None
    if archs[0] in _LLAVA_TEXT_TYPES:
        return _llava_config(hf)
    if archs[0] == "Mistral3ForConditionalGeneration":
        if (hf.get("vision_config") or {}).get("model_type") != "pixtral":
            raise ValueError(
                "Mistral3ForConditionalGeneration: expected a Pixtral vision tower, got "
                f"vision_config.model_type={(hf.get('vision_config') or {}).get('model_type')!r}"
            )
        return _pixtral_config(hf)
    if archs[0] == "LlavaForConditionalGeneration":
        if (hf.get("vision_config") or {}).get("model_type") != "pixtral":
            raise ValueError(
                "LlavaForConditionalGeneration is supported with a Pixtral vision tower only, got "
                f"vision_config.model_type={(hf.get('vision_config') or {}).get('model_type')!r}"
            )
        return _pixtral_config(hf)
    return _qwen_vl_config(hf, archs)


def _qwen_vl_config(hf: dict[str, Any], archs: list[str]) -> tuple[dict[str, Any], VisionConfig]:
    """Qwen2-VL / Qwen2.5-VL: the decoder's config with M-RoPE checked, and the tower's."""
    text = {**hf, **hf.get("text_config", {})}
    text["architectures"] = archs
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    section = rope.get("mrope_section")
    if not section:
        raise ValueError(
            f"{archs[0]}: config.json has no rope_scaling.mrope_section (M-RoPE): expected "
            "three sizes"
        )
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if sum(section) * 2 != head_dim:
        raise ValueError(
            f"rope_scaling.mrope_section={section} is invalid: expected sizes summing to "
            f"head_dim / 2 = {head_dim // 2}"
        )
    # The decoder's rotary is M-RoPE over plain frequencies; ModelConfig reads no scaling.
    text["rope_scaling"] = {"rope_type": "default", "rope_theta": rope.get("rope_theta")}
    text["rope_scaling"] = {k: v for k, v in text["rope_scaling"].items() if v is not None}
    text.pop("rope_parameters", None)
    v = hf["vision_config"]
    if archs[0] == "Qwen2_5_VLForConditionalGeneration":
        kind: VisionKind = "qwen2_5_vl"
        embed_dim, out_hidden = int(v["hidden_size"]), int(v["out_hidden_size"])
        intermediate, act = int(v["intermediate_size"]), str(v.get("hidden_act", "silu"))
    else:
        kind = "qwen2_vl"
        embed_dim, out_hidden = int(v["embed_dim"]), int(v.get("hidden_size", text["hidden_size"]))
        intermediate = int(embed_dim * float(v.get("mlp_ratio", 4)))
        act = str(v.get("hidden_act", "quick_gelu"))
    vision = VisionConfig(
        kind=kind,
        depth=int(v["depth"]),
        embed_dim=embed_dim,
        num_heads=int(v["num_heads"]),
        intermediate_size=intermediate,
        hidden_act=act,
        in_channels=int(v.get("in_channels", 3)),
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        out_hidden_size=out_hidden,
        image_token_id=int(hf["image_token_id"]),
        video_token_id=int(hf["video_token_id"]),
        vision_start_token_id=int(hf["vision_start_token_id"]),
        mrope_section=tuple(int(s) for s in section),
        window_size=int(v.get("window_size", 0)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())),
        tokens_per_second=float(v.get("tokens_per_second", 4)) if kind == "qwen2_5_vl" else 0.0,
    )
    return text, vision
