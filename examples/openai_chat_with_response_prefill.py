"""Prefill the assistant's answer: the last message is the assistant's partial reply, and
`continue_final_message` makes the model continue it instead of starting a new turn
(SGLang's openai_chat_with_response_prefill.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/openai_chat_with_response_prefill.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/openai_chat_with_response_prefill.py --launch --device cpu

With --launch, --model is the model served; without --model it builds pdserve's tiny
random-weight model (a few seconds, offline), so the continuation is gibberish.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from urllib.parse import urlparse

import openai

DESCRIPTION = """
Extract the name, size, price, and color from this product description as a JSON object:

<description>
The SmartHome Mini is a compact smart home assistant available in black or white for only $49.99.
At just 5 inches wide, it lets you control lights, thermostats, and other connected devices via
voice or app, no matter where you place it in your home.
</description>
"""


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The base URL: --base-url as given, or a prefill + decode cluster started on its port."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    port = urlparse(args.base_url).port
    model_path = args.model or tiny_model()
    topology = Topology.for_model(model_path, mode="pd", device=args.device, port=port)
    with Cluster(topology, log_level="warning") as cluster:
        yield cluster.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    with server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        prefill = "{\n"
        response = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": "You are a helpful AI assistant"},
                {"role": "user", "content": DESCRIPTION},
                {"role": "assistant", "content": prefill},  # the answer starts like this
            ],
            temperature=0,
            max_tokens=64,
            extra_body={"continue_final_message": True},
        )

    # The response holds the continuation only: the full answer is prefill + continuation.
    print(f"Continuation: {response.choices[0].message.content!r}")
    print(f"Full answer:\n{prefill}{response.choices[0].message.content}")


if __name__ == "__main__":
    main()
