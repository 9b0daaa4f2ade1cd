"""Ask a Qwen2-VL server about images: one image, several images, and SGLang's native
`/generate` with `image_data` (SGLang's multimodal/*_server.py examples, for Qwen2-VL).

Usage:
    # against a running server (`pdserve launch --model /models/Qwen2-VL-2B-Instruct`):
    python examples/multimodal/qwen2_vl_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/multimodal/qwen2_vl_server.py --launch --device cpu

Images go as OpenAI `image_url` content parts (data: URLs here; file:// paths and http(s) URLs
work too). With --launch and no --model it serves pdserve's tiny random-weight Qwen2-VL (built
offline in seconds), so the answers are gibberish; the serving path is the real one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
from collections.abc import Iterator
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    first, second = drawn_image(0, 64, 96), drawn_image(1, 96, 64)
    with server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        print(f"Single image: {ask(client, model, 'What is in this image?', [first])!r}")
        print(f"Same image again: {ask(client, model, 'What is in this image?', [first])!r}")
        both = ask(client, model, "How do these images differ?", [first, second])
        print(f"Two images: {both!r}")
        # The native API: the prompt holds one image placeholder per image.
        prompt = (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it."
            "<|im_end|>\n<|im_start|>assistant\n"
        )
        body = {"text": prompt, "image_data": first, "sampling_params": {"max_new_tokens": 16}}
        result = httpx.post(f"{base_url}/generate", json=body, timeout=120).json()
        print(f"/generate with image_data: {result['text']!r}")


if __name__ == "__main__":
    main()
