"""Videos through the model's own Hugging Face image processor, and a request's images and videos
merged into one list of items in prompt order for the worker (`protocol.MultimodalInputs`).

transformers' video processors (`Qwen2VLVideoProcessor`, `LlavaOnevisionVideoProcessor`) run on
torchvision, which pdserve does not need; their steps are the image processor's on each frame
(the PIL backend: resize, rescale, normalize, from the same preprocessor config), then:
- Qwen2-VL: each pair of frames (`temporal_patch_size`) is one temporal patch: the two frames'
  patches are stacked on the patch's temporal axis, the last frame repeated to fill a pair;
  `<|video_pad|>` stands t * h * w / merge^2 times.
- LLaVA-OneVision: each frame resized to one square tile; the model pools each frame's features
  to half their side and closes the video with one newline: frames * ceil(side / 2)^2 + 1 tokens.
Resizing differs from torchvision's in rounding only: frames already at the size the processor
picks are not resized at all (the reference tests use such frames).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pdserve.multimodal.video_loader import Video

DEFAULT_FPS = 24.0  # transformers' `VideoMetadata.sampled_fps` when a video's fps is unknown


class Videos(NamedTuple):
    """A request's videos after preprocessing."""

    pixel_values: np.ndarray  # Qwen: [patches, C*T*P*P]; LLaVA: [frames, 3, S, S] float32
    grid_thw: list[list[int]]  # Qwen, per video
    hashes: list[int]
    num_tokens: list[int]
    num_rows: list[int]  # rows of pixel_values per video
    second_per_grid_ts: list[float]  # Qwen, per video: seconds one temporal patch spans


def video_frame_size(model_path: Path) -> dict[str, int] | None:
    """Qwen2-VL's pixel bounds of a frame from the checkpoint's video_preprocessor_config.json
    (None: none there, the image processor's bounds hold, as transformers falls back to them)."""
    path = model_path / "video_preprocessor_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    size = dict(config.get("size") or {})
    for key, name in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if config.get(key):
            size[name] = int(config[key])
    return size if size.get("shortest_edge") and size.get("longest_edge") else None


def qwen_videos(
    hf: Any, videos: list[Video], merge: int, size: dict[str, int] | None = None
) -> Videos:
    """Qwen2-VL's `pixel_values_videos` and `video_grid_thw` for `videos`; `size`: a frame's
    pixel bounds (None: the image processor's)."""
    from pdserve.multimodal.processor import image_hash

    chunks, grids, hashes, tokens, rows, seconds = [], [], [], [], [], []
    t_patch = int(hf.temporal_patch_size)
    for video in videos:
        out = hf(images=video.frames, return_tensors="np", **({"size": size} if size else {}))
        _, gh, gw = (int(x) for x in out["image_grid_thw"][0])  # equal frames: equal grids
        channels = int(out["pixel_values"].shape[1]) // (t_patch * hf.patch_size**2)
        frames = np.asarray(out["pixel_values"], dtype=np.float32).reshape(
            len(video.frames), gh * gw, channels, t_patch, hf.patch_size, hf.patch_size
        )[:, :, :, 0]  # [F, n, C, P, P]: the image processor repeats a frame over time
        if pad := -len(frames) % t_patch:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        gt = len(frames) // t_patch
        patches = frames.reshape(gt, t_patch, *frames.shape[1:]).transpose(0, 2, 3, 1, 4, 5)
        patches = np.ascontiguousarray(patches.reshape(gt * gh * gw, -1))  # [N, C*T*P*P]
        grid = [gt, gh, gw]
        chunks.append(patches)
        grids.append(grid)
        hashes.append(image_hash(patches, grid))
        tokens.append(gt * gh * gw // (merge * merge))
        rows.append(len(patches))
        seconds.append(t_patch / (video.fps or DEFAULT_FPS))
    return Videos(np.concatenate(chunks), grids, hashes, tokens, rows, seconds)


def llava_videos(hf: Any, videos: list[Video], side: int) -> Videos:
    """LLaVA-OneVision's `pixel_values_videos`: each frame one tile of the processor's size;
    `side`: a tile's patches per row."""
    from transformers.image_utils import SizeDict

    from pdserve.multimodal.processor import image_hash

    size = SizeDict(height=hf.size.height, width=hf.size.width)
    chunks, hashes, tokens, rows = [], [], [], []
    for video in videos:
        tiles = []
        for frame in video.frames:
            pixels = hf.process_image(frame, do_convert_rgb=True)  # [3, H, W] uint8
            pixels = hf.resize(image=pixels, size=size, resample=hf.resample)
            pixels = hf.normalize(
                hf.rescale(pixels, hf.rescale_factor), hf.image_mean, hf.image_std
            )
            tiles.append(np.asarray(pixels, dtype=np.float32))
        frames = np.stack(tiles)  # [F, 3, S, S]
        chunks.append(frames)
        hashes.append(image_hash(frames, [len(frames), *frames.shape[2:]]))
        tokens.append(len(frames) * math.ceil(side / 2) ** 2 + 1)
        rows.append(len(frames))
    return Videos(np.concatenate(chunks), [], hashes, tokens, rows, [0.0] * len(videos))


def expand_videos(prompt: str, video_token: str, videos: Videos | None) -> str:
    """`prompt` with its k-th video placeholder repeated num_tokens[k] times."""
    counts = videos.num_tokens if videos else []
    pieces = prompt.split(video_token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"the prompt has {len(pieces) - 1} video placeholders ({video_token}) for "
            f"{len(counts)} video(s): expected one per video (the chat template writes them "
            "for video_url parts)"
        )
    return "".join(p + video_token * n for p, n in zip(pieces, counts)) + pieces[-1]


def expand_video_ids(input_ids: list[int], video_token_id: int, videos: Videos | None) -> list[int]:
    """Token ids with one placeholder per video expanded (ids already expanded: as they are)."""
    counts = videos.num_tokens if videos else []
    num_pads = sum(1 for t in input_ids if t == video_token_id)
    if num_pads == sum(counts):
        return list(input_ids)
    if num_pads != len(counts):
        raise ValueError(
            f"input_ids hold {num_pads} video tokens ({video_token_id}) for {len(counts)} "
            f"video(s): expected one per video, or {sum(counts)} (expanded)"
        )
    out: list[int] = []
    it = iter(counts)
    for t in input_ids:
        out.extend([t] * next(it) if t == video_token_id else [t])
    return out


class Item(NamedTuple):
    is_video: bool
    k: int  # the k-th image or video


def prompt_order(
    input_ids: list[int], image_token_id: int, video_token_id: int, images: Any
) -> list[Item]:
    """The request's images and videos in the order their tokens stand in the prompt;
    `images`: processor.Images. ValueError when the tokens do not match their counts."""
    image_counts = images.num_tokens
    video_counts = images.videos.num_tokens if images.videos else []
    for name, tid, counts in (("image", image_token_id, image_counts), ("video", video_token_id, video_counts)):  # fmt: skip
        found = sum(1 for t in input_ids if t == tid)
        if found != sum(counts):
            raise ValueError(
                f"the prompt holds {found} {name} tokens: expected {sum(counts)} for "
                f"{len(counts)} {name}(s)"
            )
    order, i, next_k = [], 0, {False: 0, True: 0}
    while i < len(input_ids):
        is_video = input_ids[i] == video_token_id
        if input_ids[i] != image_token_id and not is_video:
            i += 1
            continue
        k = next_k[is_video]
        order.append(Item(is_video, k))
        next_k[is_video] += 1
        i += (video_counts if is_video else image_counts)[k]
    return order


class Items(NamedTuple):
    """Images and videos as the worker takes them: one entry per item, in prompt order."""

    pixel_values: np.ndarray  # the items' pixel rows, item after item
    grid_thw: list[list[int]]  # Qwen
    hashes: list[int]
    num_tokens: list[int]
    image_sizes: list[list[int]]  # LLaVA
    num_patches: list[int]  # LLaVA: pixel rows (tiles, frames) per item
    is_video: list[bool]
    second_per_grid_ts: list[float]


def merge_items(
    input_ids: list[int], image_token_id: int, video_token_id: int, images: Any
) -> Items:
    """`images` (processor.Images, its videos included) as items in prompt order."""
    order = prompt_order(input_ids, image_token_id, video_token_id, images)
    videos = images.videos
    image_rows = images.num_patches or [t * h * w for t, h, w in images.grid_thw]
    starts = {False: np.cumsum([0, *image_rows]), True: np.cumsum([0, *(videos.num_rows if videos else [])])}  # fmt: skip
    chunks, out = [], Items(np.empty(0), [], [], [], [], [], [], [])
    for item in order:
        src, k = (videos, item.k) if item.is_video else (images, item.k)
        lo, hi = starts[item.is_video][k], starts[item.is_video][k + 1]
        chunks.append(src.pixel_values[lo:hi])
        if src.grid_thw:
            out.grid_thw.append(src.grid_thw[k])
        out.hashes.append(src.hashes[k])
        out.num_tokens.append(src.num_tokens[k])
        out.num_patches.append(int(hi - lo))
        if item.is_video and not videos.grid_thw:  # LLaVA: a frame's size
            out.image_sizes.append(list(videos.pixel_values.shape[-2:]))
        elif not item.is_video and images.image_sizes:
            out.image_sizes.append(images.image_sizes[k])
        out.is_video.append(item.is_video)
        out.second_per_grid_ts.append(videos.second_per_grid_ts[k] if item.is_video else 0.0)
    return out._replace(pixel_values=np.concatenate(chunks) if chunks else images.pixel_values)
