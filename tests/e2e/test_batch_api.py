"""The batch API on real process trees (CPU), through the `openai` client: batch answers equal
online answers (greedy), bad lines land in the error file, and a batch whose router is killed half
way completes after a restart on the same data dir, each line answered once.

One prefill + decode cluster serves the module; the last test kills its router and starts the
second (a mixed worker: the data dir does not depend on the topology). Online answers are compared
for a sample of the lines, to keep the module short.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_TOKENS = 3
NUM_CHAT_LINES = 200
INVALID_EVERY = 20  # every 20th chat line is invalid
NUM_COMPARED = 24  # chat lines also sent online
MAX_RUNNING = 16  # router.max_running_batch_lines
LONG_TOKENS = 24  # the lines of the batch whose router is killed


class Server:
    """The module's cluster; `kill_router_and_restart` replaces it by one on the same data dir."""

    def __init__(self, model: Path, data_dir: Path) -> None:
        self.model = model
        self.data_dir = data_dir
        self.cluster = self._start("pd")

    def _start(self, mode: str) -> Cluster:
        router = {"port": _free_port(), "data_dir": str(self.data_dir),
                  "max_running_batch_lines": MAX_RUNNING}  # fmt: skip
        topology = Topology.for_model(
            str(self.model), mode=mode, device="cpu", kv_transfer="tcp", num_pages=1024,
            page_size=4, router=router,
        )  # fmt: skip
        return Cluster(topology, log_level="warning", start_timeout_s=180).start()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.cluster.url}/v1", api_key="unused", max_retries=0)

    def kill_router_and_restart(self) -> None:
        router = next(c for c in self.cluster.children if c.kind == "router")
        os.kill(router.proc.pid, signal.SIGKILL)
        router.proc.wait()
        self.cluster.stop(grace_s=0)
        self.cluster = self._start("mixed")


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_llama, tmp_path_factory.mktemp("batch-data"))
    yield s
    s.cluster.stop(grace_s=1)


def upload_and_run(client: openai.OpenAI, url: str, bodies: dict[str, dict]) -> Any:
    lines = [{"custom_id": k, "method": "POST", "url": url, "body": b} for k, b in bodies.items()]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=url, completion_window="24h")


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} not done in {timeout_s} s: {batch}")


def answers(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    rows = [json.loads(r) for r in client.files.content(file_id).text.splitlines()]
    by_id = {r["custom_id"]: r["response"] for r in rows}
    assert len(by_id) == len(rows), "a line was answered twice"
    return by_id


def chat_body(i: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Tell me about the number {i}."}]
    body = {"model": "llama", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    if i % INVALID_EVERY == 7:
        body["temperature"] = "hot"  # refused by the endpoint: the error file
    return body


def test_chat_batch_equals_online_answers_and_files_invalid_lines(server: Server) -> None:
    client = server.client()
    bodies = {f"chat-{i}": chat_body(i) for i in range(NUM_CHAT_LINES)}
    batch = wait_done(client, upload_and_run(client, CHAT, bodies).id)
    invalid = {k for k, b in bodies.items() if b["temperature"] == "hot"}
    valid = sorted(set(bodies) - invalid)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (200, len(valid), len(invalid))
    errors = answers(client, batch.error_file_id)
    assert set(errors) == invalid
    assert all("temperature" in e["body"]["error"]["message"] for e in errors.values())
    outputs = answers(client, batch.output_file_id)
    assert set(outputs) == set(valid)
    assert all(o["body"]["usage"]["completion_tokens"] <= MAX_TOKENS for o in outputs.values())

    def online(key: str) -> str | None:
        return client.chat.completions.create(**bodies[key]).choices[0].message.content

    sample = valid[:: len(valid) // NUM_COMPARED][:NUM_COMPARED]
    with ThreadPoolExecutor(8) as pool:
        expected = dict(zip(sample, pool.map(online, sample)))
    got = {k: outputs[k]["body"]["choices"][0]["message"]["content"] for k in sample}
    assert got == expected


def test_completions_batch_equals_online_answers(server: Server) -> None:
    client = server.client()
    bodies = {
        f"cmpl-{i}": {
            "model": "llama",
            "prompt": f"Once upon a time {i}",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }  # fmt: skip
        for i in range(12)
    }
    batch = wait_done(client, upload_and_run(client, COMPLETIONS, bodies).id)
    assert batch.status == "completed" and batch.request_counts.completed == 12, batch
    outputs = answers(client, batch.output_file_id)
    for key in ("cmpl-0", "cmpl-5", "cmpl-11"):
        online = client.completions.create(**bodies[key]).choices[0].text
        assert outputs[key]["body"]["choices"][0]["text"] == online
        assert outputs[key]["body"]["object"] == "text_completion"


def test_a_batch_completes_after_its_router_is_killed_half_way(server: Server) -> None:
    client = server.client()
    bodies = {
        f"long-{i}": {
            "model": "llama",
            "prompt": f"Count with me: {i}",
            "temperature": 0,
            "max_tokens": LONG_TOKENS,
            "ignore_eos": True,
        }  # fmt: skip
        for i in range(2 * MAX_RUNNING)
    }
    batch_id = upload_and_run(client, COMPLETIONS, bodies).id
    while (counts := client.batches.retrieve(batch_id).request_counts).completed == 0:
        time.sleep(0.02)
    assert counts.completed < len(bodies), "the batch finished before the router was killed"
    server.kill_router_and_restart()
    client = server.client()
    batch = wait_done(client, batch_id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(bodies), 0)
    outputs = answers(client, batch.output_file_id)  # asserts each line is there once
    assert set(outputs) == set(bodies)
    assert all(o["body"]["usage"]["completion_tokens"] == LONG_TOKENS for o in outputs.values())
