"""Multimodal embeddings from a gme-Qwen2-VL style model: `/v1/embeddings` with items of text, an
image, or both (SGLang's multimodal_embedding.py).

Usage:
    # against a running server
    # (`pdserve launch --model /models/gme-Qwen2-VL-2B-Instruct --is-embedding`):
    python examples/multimodal_embedding.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal_embedding.py --launch --device cpu

Each item of `input` gives one vector: the final hidden state of gme's prompt's last token
(`<|endoftext|>`), L2-normalized. Images are URLs, file paths or base64 data (a data: URL here).
With --launch and no --model it serves pdserve's tiny random-weight Qwen2-VL as an embedding
model, so the vectors mean nothing; the serving path is the real one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import math
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx


def drawn_image(seed: int, height: int, width: int) -> str:
    """A generated PNG as a data: URL."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The base URL: --base-url as given, or a prefill + decode cluster started on its port."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster
    from pdserve.tiny_model.vlm import cached_tiny_vlm

    port = urlparse(args.base_url).port
    model_path = args.model or str(cached_tiny_vlm())
    topology = Topology.for_model(
        model_path, mode="pd", device=args.device, port=port, is_embedding=True
    )
    with Cluster(topology, log_level="warning") as cluster:
        yield cluster.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    text = "Represent this image in embedding space."
    image = drawn_image(0, 64, 96)
    with server(args) as base_url:
        model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        payload = {
            "model": model,
            "input": [{"text": text}, {"image": image}, {"text": text, "image": image}],
        }
        response = httpx.post(f"{base_url}/v1/embeddings", json=payload, timeout=120)
        response.raise_for_status()
        vectors = [item["embedding"] for item in response.json()["data"]]
    for name, vector in zip(("text", "image", "text + image"), vectors):
        print(f"Embedding of {name}: {len(vector)} values, starting {vector[:3]}")
    cosine = sum(a * b for a, b in zip(vectors[0], vectors[1]))  # both are unit vectors
    print(f"Cosine(text, image): {cosine:.4f}; norms {[round(math.hypot(*v), 4) for v in vectors]}")


if __name__ == "__main__":
    main()
