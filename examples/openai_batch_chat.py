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
import io
import json
import time

import openai

from pdserve.entrypoints.example_server import add_server_args, example_server

QUESTIONS = [
    ("You are a helpful assistant.", "Hello world! List 3 NBA players and tell a story"),
    ("You are an assistant.", "Hello world! List three capitals and tell a story"),
]


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
    add_server_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()

    with example_server(args, temp_data_dir=True) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        results = process_batch(client, input_jsonl(model, args.max_tokens), args.poll_interval)

    for result in sorted(results or [], key=lambda r: r["custom_id"]):
        answer = result["response"]["body"]["choices"][0]["message"]["content"]
        print(f"{result['custom_id']}: {answer!r}")


if __name__ == "__main__":
    main()
