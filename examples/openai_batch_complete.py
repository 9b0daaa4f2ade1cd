"""Text completions as a batch job through OpenAI's files and batches API, then a second batch
cancelled while it runs: answered lines are kept, queued ones never run
(SGLang's openai_batch_complete.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/openai_batch_complete.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/openai_batch_complete.py --launch --device cpu

With --launch, --model is the model served; without --model it builds pdserve's tiny
random-weight model (a few seconds, offline), so the completions are gibberish.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import openai

from pdserve.entrypoints.example_server import add_server_args, example_server

PROMPTS = [
    "List 3 names of famous soccer players: ",
    "List 6 names of famous basketball players: ",
    "List 6 names of famous tennis players: ",
]
ENDPOINT = "/v1/completions"


def create_batch(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> Any:
    lines = [{"custom_id": f"request-{i}", "method": "POST", "url": ENDPOINT, "body": body}
             for i, body in enumerate(bodies, start=1)]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
    )


def wait(client: openai.OpenAI, batch: Any, poll_s: float) -> Any:
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
        print(f"Batch job status: {batch.status} {batch.request_counts}")
    return batch


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = client.files.content(file_id).read().decode()
    return sorted((json.loads(line) for line in content.splitlines()),
                  key=lambda r: r["custom_id"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args()

    with example_server(args, temp_data_dir=True) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        bodies = [{"model": model, "prompt": p, "max_tokens": args.max_tokens} for p in PROMPTS]
        batch = wait(client, create_batch(client, bodies), args.poll_interval)
        for result in results(client, batch.output_file_id):
            text = result["response"]["body"]["choices"][0]["text"]
            print(f"{result['custom_id']}: {text!r}")

        # A long batch, cancelled at once: what was answered stays in its output file.
        long_bodies = [{**bodies[0], "max_tokens": 4 * args.max_tokens, "ignore_eos": True}] * 20
        batch = create_batch(client, long_bodies)
        batch = client.batches.cancel(batch.id)
        batch = wait(client, batch, args.poll_interval)
        counts = batch.request_counts
        print(f"Cancelled batch: {batch.status}, {counts.completed} of {counts.total} answered")


if __name__ == "__main__":
    main()
