"""The tokenizer process's side of a vision-language request: load the images, run the model's own
Hugging Face image processor on them, expand each image placeholder of the prompt into as many
tokens as the image has, and pack the pixels for the worker (`protocol.MultimodalInputs`).

The placeholder expansion is what transformers' `Qwen2VLProcessor` does (`<|image_pad|>` times
t * h * w / merge^2); only the image processor is loaded, as its video processor needs torchvision:
videos go through the image processor frame by frame (`video_processing.py`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pdserve.config.vision_config import (
    LlavaVisionConfig,
    PixtralVisionConfig,
    VisionConfig,
    split_vlm_config,
)
from pdserve.multimodal.image_loader import ImageLimits, load_images
from pdserve.multimodal.mrope import mrope_positions, time_intervals
from pdserve.multimodal.video_loader import VideoLimits, load_videos
from pdserve.multimodal.video_processing import (
    Videos,
    expand_video_ids,
    expand_videos,
    merge_items,
    qwen_videos,
    video_frame_size,
)
from pdserve.protocol import MultimodalInputs


class Images(NamedTuple):
    """A request's images after the image processor."""

    pixel_values: np.ndarray  # [num_patches, C * T * P * P] float32
    grid_thw: list[list[int]]  # per image
    hashes: list[int]  # per image
    num_tokens: list[int]  # per image: placeholder tokens
    image_sizes: list[list[int]] = []  # LLaVA, per image: (height, width) as sent
    num_patches: list[int] = []  # LLaVA, per image: tiles (rows of pixel_values)
    videos: Videos | None = None  # the request's videos, if any


def image_hash(pixels: np.ndarray, grid: list[int]) -> int:
    """63 bits of a hash of one image's processed pixels and grid: equal images (whatever URL
    or encoding they came in) hash equal."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8)
    digest.update(np.asarray(grid, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


class ImageProcessor:
    """Loads, preprocesses and places a request's images (one per tokenizer process)."""

    def __init__(
        self,
        model_path: str | Path,
        vision: VisionConfig | LlavaVisionConfig | PixtralVisionConfig,
        tokenizer: Any,
        limits: ImageLimits,
    ) -> None:
        from transformers import AutoImageProcessor  # heavy: only for a vision-language model

        self.hf = AutoImageProcessor.from_pretrained(str(model_path), backend="pil")
        self.vision = vision
        self.limits = limits
        self.image_token = tokenizer.convert_ids_to_tokens(vision.image_token_id)
        self.video_token_id: int = getattr(vision, "video_token_id", -1)  # -1: takes no video
        self.video_token = None
        if self.video_token_id >= 0:
            self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.video_limits = VideoLimits()
        self.model_path = Path(model_path)

    @classmethod
    def for_model(
        cls, model_path: str | Path, tokenizer: Any, limits: ImageLimits | None = None
    ) -> ImageProcessor | None:
        """The processor of a vision-language model directory; None for a text-only model."""
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            return None
        _, vision = split_vlm_config(json.loads(config_file.read_text()))
        if vision is None:
            return None
        if isinstance(vision, LlavaVisionConfig):
            from pdserve.multimodal.llava_processing import LlavaImageProcessor

            return LlavaImageProcessor(model_path, vision, tokenizer, limits or ImageLimits())
        if isinstance(vision, PixtralVisionConfig):
            from pdserve.multimodal.pixtral_processing import PixtralImageProcessor

            return PixtralImageProcessor(model_path, vision, tokenizer, limits or ImageLimits())
        return cls(model_path, vision, tokenizer, limits or ImageLimits())

    def preprocess(self, sources: list[Any]) -> Images:
        """Load and preprocess; ValueError naming a bad image or an exceeded limit."""
        pil_images = load_images(sources, self.limits)
        out = self.hf(images=pil_images, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)  # [num_patches, C*T*P*P]
        grids = [[int(x) for x in g] for g in out["image_grid_thw"]]
        merge = self.vision.spatial_merge_size
        hashes, row = [], 0
        for grid in grids:
            n = grid[0] * grid[1] * grid[2]
            hashes.append(image_hash(pixels[row : row + n], grid))
            row += n
        num_tokens = [g[0] * g[1] * g[2] // (merge * merge) for g in grids]
        return Images(pixels, grids, hashes, num_tokens)

    def preprocess_media(
        self, image_sources: list[Any] | None, video_sources: list[Any] | None
    ) -> Images:
        """A request's images and videos (either may be empty); ValueError as `preprocess`."""
        if image_sources:
            images = self.preprocess(image_sources)
        else:
            images = Images(np.empty(0, dtype=np.float32), [], [], [])
        if not video_sources:
            return images
        if self.video_token is None:
            raise ValueError("video_data: this model takes no video (images only)")
        videos = load_videos(video_sources, self.video_limits)
        return images._replace(videos=self.preprocess_videos(videos))

    def preprocess_videos(self, videos: list[Any]) -> Videos:
        size = video_frame_size(self.model_path)
        return qwen_videos(self.hf, videos, self.vision.spatial_merge_size, size)

    def expand(self, prompt: str, images: Images) -> str:
        """`prompt` with its k-th image placeholder repeated num_tokens[k] times (and videos')."""
        if self.video_token is not None:
            prompt = expand_videos(prompt, self.video_token, images.videos)
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(images.num_tokens):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} image placeholders ({self.image_token}) for "
                f"{len(images.num_tokens)} image(s): expected one per image (the chat template "
                "writes them for image_url parts)"
            )
        out = [pieces[0]]
        for n, piece in zip(images.num_tokens, pieces[1:]):
            out.append(self.image_token * n)
            out.append(piece)
        return "".join(out)

    def expand_ids(self, input_ids: list[int], images: Images) -> list[int]:
        """Token ids with one placeholder per image expanded as `expand` does text; ids that
        hold every image's tokens already (the processor's output) are returned as they are."""
        if self.video_token is not None:
            input_ids = expand_video_ids(input_ids, self.video_token_id, images.videos)
        pad = self.vision.image_token_id
        num_pads = sum(1 for t in input_ids if t == pad)
        if num_pads == sum(images.num_tokens):
            return list(input_ids)
        if num_pads != len(images.num_tokens):
            raise ValueError(
                f"input_ids hold {num_pads} image tokens ({pad}) for {len(images.num_tokens)} "
                f"image(s): expected one per image, or {sum(images.num_tokens)} (expanded)"
            )
        out: list[int] = []
        counts = iter(images.num_tokens)
        for t in input_ids:
            out.extend([pad] * next(counts) if t == pad else [t])
        return out

    def inputs(self, input_ids: list[int], images: Images) -> MultimodalInputs:
        """The message part for the worker; ValueError if the ids do not hold the images."""
        v = self.vision
        items = merge_items(input_ids, v.image_token_id, self.video_token_id, images)
        intervals = time_intervals(items.is_video, items.second_per_grid_ts, v.tokens_per_second)
        positions = mrope_positions(
            input_ids,
            v.image_token_id,
            items.grid_thw,
            v.spatial_merge_size,
            self.video_token_id,
            intervals,
        )
        pixels = items.pixel_values
        return MultimodalInputs(
            pixel_values=pixels.tobytes(),
            pixel_shape=list(pixels.shape),
            pixel_dtype="float32",
            image_grid_thw=items.grid_thw,
            image_hashes=items.hashes,
            num_image_tokens=items.num_tokens,
            image_token_id=v.image_token_id,
            mrope_delta=positions.delta,
            video_token_id=self.video_token_id,
            is_video=items.is_video,
            second_per_grid_ts=items.second_per_grid_ts,
        )
