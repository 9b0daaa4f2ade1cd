"""What the multimodal/*_server.py examples share: drawn images, a server for the duration of the
script (`--launch`), one chat question with images, and the run itself; each family's script
gives its tiny model and its native `/generate` prompt."""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai


def drawn_image(seed: int, height: int, width: int) -> str:
    """A generated PNG as a data: URL."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cached_tiny(name: str, build: Callable[[Path], Path]) -> Path:
    """A tiny random-weight model, built on first use into ~/.cache/pdserve/tiny-NAME."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    path = root / f"tiny-{name}"
    if not (path / "model.safetensors").is_file():
        build(path)
    return path


@contextlib.contextmanager
def server(args: argparse.Namespace, tiny_model: Callable[[], Path]) -> Iterator[str]:
    """The base URL: --base-url as given, or a prefill + decode cluster started on its port."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    port = urlparse(args.base_url).port
    model_path = args.model or str(tiny_model())
    topology = Topology.for_model(model_path, mode="pd", device=args.device, port=port)
    with Cluster(topology, log_level="warning") as cluster:
        yield cluster.url


def ask(client: openai.OpenAI, model: str, question: str, images: list[str]) -> str:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": question})
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=32,
    )
    usage = response.usage
    print(
        f"prompt tokens {usage.prompt_tokens}, cached {usage.prompt_tokens_details.cached_tokens}"
    )
    return response.choices[0].message.content


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args()


def run(args: argparse.Namespace, tiny_model: Callable[[], Path], native_prompt: str) -> None:
    """Chat with one image (twice: the second a prefix-cache hit) and two images, then
    `/generate` with `native_prompt` (one image placeholder) and `image_data`."""
    first, second = drawn_image(0, 64, 96), drawn_image(1, 96, 64)
    with server(args, tiny_model) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        print(f"Single image: {ask(client, model, 'What is in this image?', [first])!r}")
        print(f"Same image again: {ask(client, model, 'What is in this image?', [first])!r}")
        both = ask(client, model, "How do these images differ?", [first, second])
        print(f"Two images: {both!r}")
        body = {
            "text": native_prompt,
            "image_data": first,
            "sampling_params": {"max_new_tokens": 16},
        }
        result = httpx.post(f"{base_url}/generate", json=body, timeout=120).json()
        print(f"/generate with image_data: {result['text']!r}")
