"""Images from what clients send (data: URLs, base64, file paths, http(s) URLs) to RGB PIL images,
within limits. Runs in the tokenizer process, off its event loop.

Every refusal is a ValueError whose message names the image and the problem, which the tokenizer
process returns to the client as a 400: an image too large in bytes or pixels, not an image, a
truncated file, a URL that cannot be fetched in time.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DATA_PREFIX = "data:"
_FILE_PREFIX = "file://"
_HTTP_PREFIXES = ("http://", "https://")
_BASE64_MIN_CHARS = 64  # a bare string this long that is not a path is read as base64


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send (each exceeded limit is a 400 naming it)."""

    max_images: int = 16  # per request
    max_image_pixels: int = 4096 * 4096  # width * height of one image, before resizing
    max_image_bytes: int = 20 * 2**20  # one image's encoded bytes (a download stops past it)
    fetch_timeout_s: float = 10.0  # an http(s) image: connect and read

    def __post_init__(self) -> None:
        for name in ("max_images", "max_image_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected >= 1")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s={self.fetch_timeout_s!r} is invalid: expected > 0")


def check_count(num_images: int, limits: ImageLimits) -> None:
    if num_images > limits.max_images:
        raise ValueError(
            f"the request has {num_images} images: expected at most {limits.max_images} "
            "(image limit per request)"
        )


def load_images(sources: list[Any], limits: ImageLimits) -> list[Any]:
    """RGB PIL images of `sources`, in order; ValueError naming the first bad one."""
    check_count(len(sources), limits)
    return [load_image(source, limits, f"image {i}") for i, source in enumerate(sources)]


def load_image(source: Any, limits: ImageLimits, where: str = "image") -> Any:
    """One RGB PIL image; ValueError naming `where` and what is wrong with it."""
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"{where}: expected a URL, a file path or base64 text, got {type(source).__name__}"
        )
    data = _read_bytes(source, limits, where)
    return decode_image(data, limits, where)


def decode_image(data: bytes, limits: ImageLimits, where: str = "image") -> Any:
    """Decode encoded image bytes to RGB, checking the pixel count before decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{where}: has too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{where}: is not an image (no decodable image format)") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ValueError(
            f"{where}: has too many pixels ({width} x {height} = {width * height}): expected "
            f"at most {limits.max_image_pixels}"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: is truncated or corrupt ({e})") from None
    return image.convert("RGB")


def read_source(source: str, limits: ImageLimits, where: str) -> bytes:
    """The encoded bytes `source` names (a video file's too), within the size limit."""
    return _read_bytes(source, limits, where)


def _read_bytes(source: str, limits: ImageLimits, where: str) -> bytes:
    if source.startswith(_DATA_PREFIX):
        header, sep, payload = source.partition(",")
        if not sep or ";base64" not in header:
            raise ValueError(f"{where}: a data: URL must be 'data:<type>;base64,<data>'")
        return _b64(payload, limits, where)
    if source.startswith(_HTTP_PREFIXES):
        return _fetch(source, limits, where)
    if source.startswith(_FILE_PREFIX):
        return _read_file(Path(source.removeprefix(_FILE_PREFIX)), limits, where)
    if len(source) < 4096 and Path(source).is_file():
        return _read_file(Path(source), limits, where)
    if len(source) >= _BASE64_MIN_CHARS:
        return _b64(source, limits, where)
    raise ValueError(
        f"{where}: {source[:80]!r} is not a data:/http(s)/file:// URL, an existing file or "
        "base64 data"
    )


def _check_size(num_bytes: int, limits: ImageLimits, where: str) -> None:
    if num_bytes > limits.max_image_bytes:
        raise ValueError(
            f"{where}: is larger than {limits.max_image_bytes} bytes (image size limit)"
        )


def _b64(payload: str, limits: ImageLimits, where: str) -> bytes:
    _check_size(len(payload) * 3 // 4, limits, where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: is not valid base64") from None


def _read_file(path: Path, limits: ImageLimits, where: str) -> bytes:
    if not path.is_file():
        raise ValueError(f"{where}: file {str(path)!r} does not exist")
    _check_size(path.stat().st_size, limits, where)
    return path.read_bytes()


def _fetch(url: str, limits: ImageLimits, where: str) -> bytes:
    """GET `url` within the timeout, reading at most max_image_bytes + 1 bytes."""
    request = urllib.request.Request(url, headers={"User-Agent": "pdserve"})
    try:
        with urllib.request.urlopen(request, timeout=limits.fetch_timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit():
                _check_size(int(length), limits, where)
            data = resp.read(limits.max_image_bytes + 1)
    except ValueError:
        raise
    except urllib.error.HTTPError as e:
        raise ValueError(
            f"{where}: could not fetch {url[:200]!r} (HTTP {e.code} {e.reason})"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"{where}: could not fetch {url[:200]!r} ({reason})") from None
    _check_size(len(data), limits, where)
    return data
