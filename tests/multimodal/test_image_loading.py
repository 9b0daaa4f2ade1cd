"""Images from data: URLs, base64, files and http(s), within limits; every bad image is a
ValueError naming the image and the problem. The processor's placeholder expansion and hashing."""

from __future__ import annotations

import base64
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vlm_reference import data_url, png_bytes, random_image

from pdserve.multimodal.cache_key import IMAGE_KEY_BASE, image_keyed_ids
from pdserve.multimodal.encoder_cache import EncoderCache
from pdserve.multimodal.image_loader import ImageLimits, load_image, load_images
from pdserve.multimodal.processor import ImageProcessor
from pdserve.protocol import MultimodalInputs

LIMITS = ImageLimits(max_images=3, max_image_pixels=200 * 200, max_image_bytes=200_000)


@pytest.fixture(scope="module")
def image() -> Any:
    return random_image(np.random.default_rng(0), 40, 60)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(2.0)
        body = self.routes.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_base(image: Any) -> Iterator[str]:
    _Handler.routes = {
        "/cat.png": png_bytes(image),
        "/slow.png": png_bytes(image),
        "/big.png": b"\x89PNG" + b"\0" * 300_000,
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pixels(img: Any) -> np.ndarray:
    return np.asarray(img)


def test_every_source_kind_gives_the_same_pixels(image: Any, tmp_path: Path, http_base: str):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(image))
    raw_b64 = base64.b64encode(png_bytes(image)).decode()
    sources = [data_url(image), raw_b64, str(path), f"file://{path}", f"{http_base}/cat.png"]
    for source in sources:
        np.testing.assert_array_equal(pixels(load_image(source, LIMITS)), pixels(image))


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda img, base: "data:image/png;base64," + base64.b64encode(b"hello" * 20).decode(),
         "image: is not an image"),
        (lambda img, base: "data:image/png;base64," + base64.b64encode(png_bytes(img)[:200]).decode(),
         "image: is truncated or corrupt"),
        (lambda img, base: data_url(random_image(np.random.default_rng(1), 250, 250)),
         r"too many pixels \(250 x 250 = 62500\): expected at most 40000"),
        (lambda img, base: "data:image/png;base64,@@@@" + "A" * 80, "is not valid base64"),
        (lambda img, base: "data:image/png,raw", "must be 'data:<type>;base64,<data>'"),
        (lambda img, base: "file:///no/such/image.png", "does not exist"),
        (lambda img, base: "cat.png", "is not a data:/http"),
        (lambda img, base: f"{base}/missing.png", "could not fetch .*404"),
        (lambda img, base: "http://127.0.0.1:1/cat.png", "could not fetch"),
        (lambda img, base: f"{base}/big.png", "is larger than 200000 bytes"),
        (lambda img, base: "data:image/png;base64," + "A" * 300_000, "is larger than 200000"),
    ],
    ids=[
        "not-an-image", "truncated-png", "too-many-pixels", "bad-base64", "data-url-not-base64",
        "missing-file", "not-a-source", "http-404", "unreachable", "download-too-big",
        "base64-too-big",
    ],
)  # fmt: skip
def test_bad_images_are_refused_naming_the_problem(
    image: Any, http_base: str, make: Any, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        load_image(make(image, http_base), LIMITS)


def test_a_slow_download_times_out(image: Any, http_base: str) -> None:
    limits = ImageLimits(fetch_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ValueError, match="could not fetch"):
        load_image(f"{http_base}/slow.png", limits)
    assert time.monotonic() - started < 1.5


def test_image_count_limit_names_it(image: Any) -> None:
    with pytest.raises(ValueError, match="has 4 images: expected at most 3"):
        load_images([data_url(image)] * 4, LIMITS)
    with pytest.raises(ValueError, match="image 1: is not an image"):
        load_images([data_url(image), "data:image/png;base64," + "QUJD" * 20], LIMITS)


def test_processor_expands_placeholders_and_hashes_by_content(
    tiny_vlm: Path, vlm_tokenizer: Any, image: Any, tmp_path: Path
) -> None:
    processor = ImageProcessor.for_model(tiny_vlm, vlm_tokenizer)
    assert processor is not None
    path = tmp_path / "same.png"
    path.write_bytes(png_bytes(image))
    other = random_image(np.random.default_rng(5), 40, 60)
    loaded = processor.preprocess([data_url(image), str(path), data_url(other)])
    assert loaded.hashes[0] == loaded.hashes[1] != loaded.hashes[2]
    assert loaded.num_tokens == [t * h * w // 4 for t, h, w in loaded.grid_thw]
    pad = "<|image_pad|>"
    text = processor.expand(f"a{pad}b{pad}c{pad}d", loaded)
    assert text.count(pad) == sum(loaded.num_tokens)
    assert text.startswith("a" + pad * loaded.num_tokens[0] + "b")
    with pytest.raises(ValueError, match="has 1 image placeholders .* for 3 image"):
        processor.expand(f"only one {pad}", loaded)
    ids = vlm_tokenizer.encode(text, add_special_tokens=False)
    mm = processor.inputs(ids, loaded)
    restored = np.frombuffer(mm.pixel_values, dtype=np.float32).reshape(mm.pixel_shape)
    np.testing.assert_array_equal(restored, loaded.pixel_values)


def test_processor_is_none_for_a_text_only_model(tiny_llama: Path, vlm_tokenizer: Any) -> None:
    assert ImageProcessor.for_model(tiny_llama, vlm_tokenizer) is None


def test_cache_key_replaces_each_images_placeholders_by_its_hash() -> None:
    mm = MultimodalInputs(b"", [0, 0], "float32", [[1, 2, 2], [1, 4, 2]], [11, 22], [1, 2], 9)
    ids = [1, 9, 2, 9, 9, 3, 9]  # the last 9: a generated token, past every image
    assert image_keyed_ids(ids, mm) == [
        1, IMAGE_KEY_BASE + 11, 2, IMAGE_KEY_BASE + 22, IMAGE_KEY_BASE + 22, 3, 9,
    ]  # fmt: skip
    assert image_keyed_ids(ids[:3], mm) == [1, IMAGE_KEY_BASE + 11, 2]


def test_encoder_cache_evicts_least_recently_used_within_its_bound() -> None:
    import torch

    cache = EncoderCache(max_tokens=10)
    cache.put(1, torch.zeros(4, 2))
    cache.put(2, torch.zeros(4, 2))
    assert cache.get(1) is not None  # 1 is now the most recent
    cache.put(3, torch.zeros(4, 2))  # 12 rows > 10: the least recent (2) goes
    assert cache.get(2) is None and cache.get(1) is not None and cache.get(3) is not None
    cache.put(4, torch.zeros(11, 2))  # larger than the whole cache: not kept
    assert cache.get(4) is None and cache.num_tokens == 8
