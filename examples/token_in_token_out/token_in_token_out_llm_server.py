"""Token in, token out over HTTP: POST /generate with `input_ids`, read `output_ids`
(SGLang's token_in_token_out/token_in_token_out_llm_server.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/token_in_token_out/token_in_token_out_llm_server.py \\
        --base-url http://127.0.0.1:8000 --model PATH
    # or start a prefill + decode server for the duration of the script:
    python examples/token_in_token_out/token_in_token_out_llm_server.py --launch --device cpu

--model is the tokenizer (and, with --launch, the model served). Without --model it builds
pdserve's tiny random-weight model (a few seconds, offline), the one `pdserve demo` serves.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
from transformers import AutoTokenizer


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


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
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    model_path = args.model or tiny_model()

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    token_ids_list = [tokenizer.encode(prompt) for prompt in prompts]

    with server(args, model_path) as base_url:
        json_data = {
            "input_ids": token_ids_list,
            "sampling_params": {"temperature": 0.8, "top_p": 0.95},
        }
        response = httpx.post(f"{base_url}/generate", json=json_data, timeout=300)
        response.raise_for_status()
        outputs = response.json()

    for input_ids, output in zip(token_ids_list, outputs):
        print("===============================")
        print(f"Input: {input_ids}\nGenerated token ids: {output['output_ids']}")


if __name__ == "__main__":
    main()
