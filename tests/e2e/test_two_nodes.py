"""Two launchers, one per node of a two-node topology (both on this machine's loopback): prefill on
node a with the router, decode on node b; every socket is tcp, CURVE-authenticated with the
cluster secret. Outputs equal the in-process engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.engine import Engine
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow

PROMPTS = ["Hello there, how are you?", "Über café 東京 😀"]


def test_prefill_and_decode_on_two_nodes_over_tcp(tiny_llama: Path) -> None:
    topology = Topology.from_dict(
        {
            "model": str(tiny_llama),
            "device": "cpu",
            "router": {"port": _free_port(17), "node": "a"},
            "nodes": [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.1"}],
            "prefill": [{"node": "a"}],
            "decode": [{"node": "b"}],
            "kv_transfer": {"backend": "tcp"},
            "scheduler": {"num_pages": 256, "page_size": 4},
            "security": {"cluster_secret": "two-nodes-test-secret"},  # CURVE on every tcp socket
        }
    )
    ref = Engine(str(tiny_llama), in_process=True, device="cpu", num_pages=256)
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    expected = [o["text"] for o in ref.generate(PROMPTS, params)]
    node_b = Cluster(topology, node="b", log_level="warning", start_timeout_s=120)
    with ThreadPoolExecutor(1) as pool:  # both launchers start at once, as on two machines
        b_started = pool.submit(node_b.start)
        try:
            with Cluster(topology, node="a", log_level="warning", start_timeout_s=120) as a:
                assert {c.name for c in b_started.result().children} == {"decode0"}
                assert {c.name for c in a.children} == {"prefill0", "tokenizer0", "router"}
                client = openai.OpenAI(base_url=f"{a.url}/v1", api_key="x", max_retries=0)
                got = [
                    client.completions.create(
                        model="llama",
                        prompt=p,
                        max_tokens=8,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    )
                    .choices[0]
                    .text
                    for p in PROMPTS
                ]
        finally:
            b_started.exception()  # node b's start has ended, whether or not node a's did
            node_b.stop()
    assert got == expected
