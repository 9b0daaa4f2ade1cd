"""Token in, token out with images over HTTP: POST /generate with `input_ids` and `image_data`,
read `output_ids` (SGLang's token_in_token_out/token_in_token_out_vlm_server.py).

Usage:
    # against a running Qwen2-VL server (`pdserve launch --model /models/Qwen2-VL-2B-Instruct`):
    python examples/token_in_token_out/token_in_token_out_vlm_server.py \\
        --base-url http://127.0.0.1:8000 --model /models/Qwen2-VL-2B-Instruct
    # or start a prefill + decode server for the duration of the script:
    python examples/token_in_token_out/token_in_token_out_vlm_server.py --launch --device cpu

The ids hold one image placeholder per image (the server expands each into the image's tokens;
ids the Hugging Face processor already expanded are taken as they are). --model is the tokenizer
(and, with --launch, the model served); without it pdserve's tiny random-weight Qwen2-VL.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
from transformers import AutoTokenizer


def drawn_image(seed: int) -> str:
    """A generated 64 x 96 PNG, base64-encoded (image_data takes bare base64 too)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def server(args: argparse.Namespace, model_path: str) -> Iterator[str]:
    """The base URL: --base-url as given, or a prefill + decode cluster started on its port."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    port = urlparse(args.base_url).port
    topology = Topology.for_model(model_path, mode="pd", device=args.device, port=port)
    with Cluster(topology, log_level="warning") as cluster:
        yield cluster.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="a Hugging Face VLM directory (default: tiny Qwen2-VL)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    if args.model:
        model_path = args.model
    else:
        from pdserve.tiny_model.vlm import cached_tiny_vlm

        model_path = str(cached_tiny_vlm())

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    content = [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer.encode(prompt, add_special_tokens=False)

    with server(args, model_path) as base_url:
        json_data = {
            "input_ids": input_ids,
            "image_data": drawn_image(0),
            "sampling_params": {"temperature": 0, "max_new_tokens": 16},
        }
        response = httpx.post(f"{base_url}/generate", json=json_data, timeout=300)
        response.raise_for_status()
        output = response.json()

    print("===============================")
    print(f"Input: {input_ids}\nGenerated token ids: {output['output_ids']}")
    print(f"Prompt tokens (image tokens included): {output['meta_info']['prompt_tokens']}")


if __name__ == "__main__":
    main()
