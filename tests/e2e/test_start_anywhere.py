"""A cluster started from a directory that holds a folder named `pdserve` still serves: children
never import the package from the working directory."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

pytestmark = pytest.mark.slow


def test_a_pdserve_folder_in_the_working_directory_does_not_shadow_the_package(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pdserve").mkdir()
    (tmp_path / "pdserve" / "stray.sock").write_text("")
    monkeypatch.chdir(tmp_path)
    topology = Topology.for_model(
        str(tiny_llama), mode="mixed", device="cpu", port=_free_port(), num_pages=256, page_size=4
    )
    cluster = Cluster(topology, log_level="warning", start_timeout_s=180).start()
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1
        (worker,) = [c for c in cluster.children if c.kind == "worker"]
        environ = Path(f"/proc/{worker.proc.pid}/environ").read_bytes().split(b"\0")
        if "OMP_NUM_THREADS" not in os.environ:  # a CPU worker gets its share of the cores
            assert any(v.startswith(b"OMP_NUM_THREADS=") for v in environ)
        socket_dir = Path(cluster._socket_dir)
        assert socket_dir.is_dir() and socket_dir.name.startswith("pdserve-sockets-")
    finally:
        cluster.stop(grace_s=1)
    assert not socket_dir.exists(), "the cluster's socket folder outlives it"
