"""Videos from what clients send to equal-sized RGB PIL frames, within limits. Runs in the
tokenizer process, off its event loop, as images do (`image_loader.py`).

A video is either a file (a data:/http(s)/file:// URL, a path or base64, as an image is),
decoded with PyAV and sampled uniformly down to `max_frames` frames (transformers' sampling), or
a list of frames (each an image source), or vLLM's data URL of frames:
`data:video/jpeg;base64,<frame>,<frame>,...`. Every refusal is a ValueError naming the video and
the problem, which reaches the client as a 400: too many videos or frames, too many pixels,
frames of different sizes, not a video, a truncated file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pdserve.multimodal.image_loader import ImageLimits, load_image, read_source

_FRAMES_DATA_PREFIXES = ("data:video/jpeg;base64,", "data:video/png;base64,")
# Demuxers a client's file may use: plain containers only, never one that opens other files or
# URLs (playlists, concat lists), which FFmpeg would fetch on the server's behalf.
_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,gif"


@dataclass(frozen=True)
class VideoLimits:
    """What one request may send (each exceeded limit is a 400 naming it)."""

    max_videos: int = 4  # per request
    max_frames: int = 32  # per video: a file is sampled down to it, a longer frame list refused
    max_video_pixels: int = 32 * 1280 * 720  # width * height * frames of one video, as sent
    max_video_bytes: int = 64 * 2**20  # one video file's (or one frame's) encoded bytes
    fetch_timeout_s: float = 30.0
    # Frames a second to sample a file at (Qwen2-VL's recipe, as vLLM and SGLang sample: 2.0),
    # between 4 and max_frames frames, an even count; 0: max_frames spread evenly over the file
    # (transformers' default).
    sample_fps: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_videos", "max_frames", "max_video_pixels", "max_video_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected >= 1")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s={self.fetch_timeout_s!r} is invalid: expected > 0")
        if self.sample_fps < 0:
            raise ValueError(f"sample_fps={self.sample_fps!r} is invalid: expected >= 0 (0: off)")

    def as_image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_images=self.max_frames,
            max_image_pixels=self.max_video_pixels,
            max_image_bytes=self.max_video_bytes,
            fetch_timeout_s=self.fetch_timeout_s,
        )


class Video(NamedTuple):
    frames: list[Any]  # RGB PIL images, all one size
    fps: float | None  # of the frames as sampled; None: not known (a list of frames)


def load_videos(sources: list[Any], limits: VideoLimits) -> list[Video]:
    if len(sources) > limits.max_videos:
        raise ValueError(
            f"the request has {len(sources)} videos: expected at most {limits.max_videos} "
            "(video limit per request)"
        )
    return [load_video(source, limits, f"video {i}") for i, source in enumerate(sources)]


def load_video(source: Any, limits: VideoLimits, where: str = "video") -> Video:
    """One video; ValueError naming `where` and what is wrong with it."""
    if isinstance(source, list):
        return _frames_video(source, limits, where)
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"{where}: expected a URL, a file path, base64 text or a list of frames, got "
            f"{type(source).__name__}"
        )
    if source.startswith(_FRAMES_DATA_PREFIXES):
        _, payload = source.split(",", 1)
        return _frames_video(
            ["data:image/*;base64," + p for p in payload.split(",")], limits, where
        )
    data = read_source(source, limits.as_image_limits(), where)
    return decode_video(data, limits, where)


def _frames_video(sources: list[Any], limits: VideoLimits, where: str) -> Video:
    if not sources or len(sources) > limits.max_frames:
        raise ValueError(
            f"{where}: has {len(sources)} frames: expected 1 to {limits.max_frames} (frame limit)"
        )
    image_limits = limits.as_image_limits()
    frames = [load_image(s, image_limits, f"{where} frame {i}") for i, s in enumerate(sources)]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{where}: frames of one video must have one size, got {sorted(sizes)}")
    _check_pixels(len(frames), *frames[0].size, limits, where)
    return Video(frames, None)


def _check_pixels(
    num_frames: int, width: int, height: int, limits: VideoLimits, where: str
) -> None:
    total = num_frames * width * height
    if total > limits.max_video_pixels:
        raise ValueError(
            f"{where}: has too many pixels ({num_frames} frames of {width} x {height} = {total}): "
            f"expected at most {limits.max_video_pixels} (video pixel limit)"
        )


def sample_indices(total: int, max_frames: int) -> np.ndarray:
    """Uniformly spaced frame indices, at most `max_frames` (transformers' default sampling)."""
    num = min(total, max_frames)
    return np.arange(0, total, total / num).astype(int)[:num]


_MIN_FPS_FRAMES = 4  # fps sampling keeps at least this many frames (when the file has them)


def fps_indices(total: int, file_fps: float, sample_fps: float, max_frames: int) -> np.ndarray:
    """Frame indices at `sample_fps` frames a second of a file at `file_fps`: as many frames as
    its duration gives, the nearest even count (the tower pairs frames) between 4 and
    `max_frames`, spread evenly from the first frame to the last; a file (or a limit) of 4
    frames or fewer keeps them all."""
    most = min(max_frames, total)
    if most <= _MIN_FPS_FRAMES:
        num = most
    else:
        wanted = min(max(total / file_fps * sample_fps, _MIN_FPS_FRAMES), most)
        num = min(2 * round(wanted / 2), most - most % 2)
    return np.round(np.linspace(0, total - 1, num)).astype(int)


def decode_video(data: bytes, limits: VideoLimits, where: str = "video") -> Video:
    """Decode a video file's bytes with PyAV: the size and frame count are checked before any
    frame is decoded, and only the sampled frames are kept."""
    import av

    try:
        container = av.open(io.BytesIO(data), options={"format_whitelist": _FORMATS})
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        raise ValueError(f"{where}: is not a video (no decodable video format)") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{where}: has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        total = stream.frames or _count_frames(container, where)
        if total < 1 or width < 1 or height < 1:
            raise ValueError(f"{where}: has no frames")
        fps = float(stream.average_rate) if stream.average_rate else None
        if limits.sample_fps and fps:
            indices = fps_indices(total, fps, limits.sample_fps, limits.max_frames)
        else:
            indices = sample_indices(total, limits.max_frames)
        _check_pixels(len(indices), width, height, limits, where)
        frames = _decode_frames(container, indices, where)
    if not frames:
        raise ValueError(f"{where}: has no decodable frames")
    sampled_fps = fps * len(frames) / total if fps else None
    return Video(frames, sampled_fps)


def _count_frames(container: Any, where: str) -> int:
    """Frames of a container that does not say (counted from packets, nothing decoded)."""
    import av

    try:
        count = sum(1 for p in container.demux(video=0) if p.size)
        container.seek(0)
    except av.error.FFmpegError as e:
        raise ValueError(f"{where}: is truncated or corrupt ({e})") from None
    return count


def _decode_frames(container: Any, indices: np.ndarray, where: str) -> list[Any]:
    import av

    wanted, frames = set(int(i) for i in indices), []
    last = int(indices[-1])
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(frame.to_image().convert("RGB"))
            if i >= last:
                break
    except av.error.FFmpegError as e:
        raise ValueError(f"{where}: is truncated or corrupt ({e})") from None
    return frames
