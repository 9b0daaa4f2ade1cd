"""Chat completions as a batch job through OpenAI's files and batches API: upload a JSONL file of
requests, create a batch, poll it until it ends, download the answers
(SGLang's openai_batch_chat.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/openai_batch_chat.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/openai_batch_chat.py --launch --device cpu

Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}; each
output line is {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"},
in the order the lines finished. With --launch, --model is the model served; without --model it
builds pdserve's tiny random-weight model (a few seconds, offline), so the answers are gibberish.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import openai

QUESTIONS = [
    ("You are a helpful assistant.", "Hello world! List 3 NBA players and tell a story"),
    ("You are an assistant.", "Hello world! List three capitals and tell a story"),
]


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The base URL: --base-url as given, or a prefill + decode cluster started on its port
    (its files and batches in a temporary data dir)."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    port = urlparse(args.base_url).port
    with tempfile.TemporaryDirectory() as data_dir:
        topology = Topology.for_model(
            args.model or tiny_model(), mode="pd", device=args.device, port=port,
            router={"data_dir": data_dir},
        )  # fmt: skip
        with Cluster(topology, log_level="warning") as cluster:
            yield cluster.url


def input_jsonl(model: str, max_tokens: int) -> bytes:
    lines = []
    for i, (system, user) in enumerate(QUESTIONS, start=1):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        body = {"model": model, "messages": messages, "max_tokens": max_tokens}
        lines.append({"custom_id": f"request-{i}", "method": "POST",
                      "url": "/v1/chat/completions", "body": body})  # fmt: skip
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def process_batch(client: openai.OpenAI, data: bytes, poll_s: float) -> list[dict] | None:
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "cancelled"):
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
        print(f"Batch job status: {batch.status} {batch.request_counts}")
    if batch.status != "completed":
        print(f"Batch job {batch.status}; errors: {batch.errors}")
        return None
    content = client.files.content(batch.output_file_id).read()
    return [json.loads(line) for line in content.decode().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()

    with server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        results = process_batch(client, input_jsonl(model, args.max_tokens), args.poll_interval)

    for result in sorted(results or [], key=lambda r: r["custom_id"]):
        answer = result["response"]["body"]["choices"][0]["message"]["content"]
        print(f"{result['custom_id']}: {answer!r}")


if __name__ == "__main__":
    main()
