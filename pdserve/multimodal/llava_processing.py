"""LLaVA-OneVision's image layout, shared by the tokenizer process (how many tokens an image
takes) and the model (how its tiles' features are packed): one image is tiled at the resolution
of the config's `image_grid_pinpoints` that fits it best, plus a base tile of the whole image;
several images take one square tile each. The arithmetic is transformers' (processor and model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.config.vision_config import LlavaVisionConfig
from pdserve.multimodal.image_loader import ImageLimits, load_images
from pdserve.multimodal.processor import ImageProcessor, Images, image_hash
from pdserve.multimodal.video_processing import Videos, llava_videos, merge_items
from pdserve.protocol import MultimodalInputs


def best_resolution(
    size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The (height, width) tiling that keeps most of the image's pixels, then wastes least."""
    height, width = size
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def tile_grid(size: tuple[int, int], v: LlavaVisionConfig) -> tuple[int, int]:
    """(rows, columns) of tiles one image is cut into."""
    height, width = best_resolution(size, v.grid_pinpoints)
    return height // v.image_size, width // v.image_size


def unpadded_shape(size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int]:
    """(rows, columns) of features left once the padding around the resized image is cut off."""
    height, width = size
    if width / height > grid_w / grid_h:
        new_height = int(round(height * (grid_w / width), 7))
        return grid_h - (grid_h - new_height) // 2 * 2, grid_w
    new_width = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - (grid_w - new_width) // 2 * 2


def num_image_tokens(size: tuple[int, int], v: LlavaVisionConfig, is_multi: bool) -> int:
    """Placeholder tokens of one image: base tile, then (unless it is one of several OneVision
    images) its tiles' unpadded features with a newline closing each row, shrunk beyond
    `max_num_tiles` tiles."""
    side = v.image_size // v.patch_size
    base = side * side + (v.tower == "clip") - v.drop_first_feature  # CLIP has a CLS position
    if is_multi and v.single_tile_when_several:
        return base + 1  # the base tile and one newline
    rows, cols = tile_grid(size, v)
    height, width = unpadded_shape(size, rows * side, cols * side)
    if v.max_num_tiles:
        ratio = math.sqrt(height * width / (v.max_num_tiles * side * side))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return base + height * width + height


class LlavaImageProcessor(ImageProcessor):
    """The tokenizer side for LLaVA-OneVision: transformers' image processor (PIL backend)."""

    def __init__(
        self, model_path: str | Path, vision: LlavaVisionConfig, tokenizer: Any, limits: ImageLimits
    ) -> None:
        super().__init__(model_path, vision, tokenizer, limits)
        self.llava = vision

    def preprocess(self, sources: list[Any]) -> Images:
        pil_images = load_images(sources, self.limits)
        is_multi = len(pil_images) > 1 and self.llava.single_tile_when_several
        # OneVision: a nested list is one prompt's images (several get one square tile each).
        batch = [pil_images] if self.llava.single_tile_when_several else pil_images
        out = self.hf(images=batch, return_tensors="np")
        sizes = [[int(h), int(w)] for h, w in out["image_sizes"]]
        tiles, hashes, tokens, counts = [], [], [], []
        for k, size in enumerate(sizes):
            rows, cols = tile_grid((size[0], size[1]), self.llava)
            count = 1 if is_multi else rows * cols + 1
            image_tiles = np.asarray(out["pixel_values"][k][:count], dtype=np.float32)
            tiles.append(image_tiles)
            hashes.append(image_hash(image_tiles, size))
            tokens.append(num_image_tokens((size[0], size[1]), self.llava, is_multi))
            counts.append(count)
        pixels = np.concatenate(tiles)  # [num_tiles, 3, S, S]
        return Images(pixels, [], hashes, tokens, sizes, counts)

    def preprocess_videos(self, videos: list[Any]) -> Videos:
        return llava_videos(self.hf, videos, self.llava.image_size // self.llava.patch_size)

    def inputs(self, input_ids: list[int], images: Images) -> MultimodalInputs:
        items = merge_items(input_ids, self.llava.image_token_id, self.video_token_id, images)
        pixels = items.pixel_values  # [tiles and frames, 3, S, S]
        return MultimodalInputs(
            pixel_values=pixels.tobytes(),
            pixel_shape=list(pixels.shape),
            pixel_dtype="float32",
            image_grid_thw=[],
            image_hashes=items.hashes,
            num_image_tokens=items.num_tokens,
            image_token_id=self.llava.image_token_id,
            image_sizes=items.image_sizes,
            num_image_patches=items.num_patches,
            video_token_id=self.video_token_id,
            is_video=items.is_video,
        )
