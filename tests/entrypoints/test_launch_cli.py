"""The launch command refuses what it cannot do with a message, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints import launch, launch_cli
from pdserve.entrypoints.cli import main


def test_missing_topology_file_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--topology", "/no/such.yaml"]) == 2
    assert "/no/such.yaml" in capsys.readouterr().err


def test_unknown_topology_key_is_named(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\nschedular: {{page_size: 4}}\n")
    assert main(["launch", "--topology", str(path)]) == 2
    assert "schedular" in capsys.readouterr().err


def test_a_multi_node_topology_needs_a_known_node(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        f"model: {tiny_llama}\ndevice: cpu\n"
        "nodes: [{name: a, address: 127.0.0.1}, {name: b, address: 127.0.0.1}]\n"
        "prefill: [{node: a}]\ndecode: [{node: b}]\n"
    )
    assert main(["launch", "--topology", str(path), "--node", "c"]) == 2
    assert "expected one of ['a', 'b']" in capsys.readouterr().err
    assert main(["launch", "--topology", str(path)]) == 2


def test_flags_with_a_topology_are_refused(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\n")
    assert main(["launch", "--topology", str(path), "--page-size", "8"]) == 2
    assert "page_size" in capsys.readouterr().err


class LaunchedTopology:
    """Stands in for the Cluster `pdserve launch` would start: keeps the topology it was given."""

    topology: Topology | None = None

    def __init__(self, topology: Topology, **kwargs: Any) -> None:
        LaunchedTopology.topology = topology


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> type[LaunchedTopology]:
    LaunchedTopology.topology = None
    monkeypatch.setattr(launch, "Cluster", LaunchedTopology)
    monkeypatch.setattr(launch_cli, "_serve", lambda cluster, grace_s: 0)
    return LaunchedTopology


def test_host_and_port_flags_override_the_topology_router(
    tmp_path: Path, tiny_llama: Path, launched: type[LaunchedTopology]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\ndevice: cpu\nrouter: {{host: 127.0.0.1, port: 8000}}\n")
    assert main(["launch", "--topology", str(path), "--port", "8123", "--host", "0.0.0.0"]) == 0
    assert launched.topology is not None
    assert (launched.topology.router.host, launched.topology.router.port) == ("0.0.0.0", 8123)
    assert main(["launch", "--topology", str(path), "--port", "70000"]) == 2


def test_other_flags_with_a_topology_are_refused_naming_them(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\n")
    assert main(["launch", "--topology", str(path), "--port", "8123", "--random-seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "['seed']" in err and "--host and --port" in err


def test_sglang_flags_set_the_same_options(
    tiny_llama: Path, launched: type[LaunchedTopology]
) -> None:
    argv = ["launch", "--model-path", str(tiny_llama), "--device", "cpu", "--tp-size", "1"]
    argv += ["--mem-fraction-static", "0.5", "--disable-radix-cache", "--random-seed", "3"]
    argv += ["--chunked-prefill-size", "64", "--max-prefill-tokens", "512"]
    argv += ["--context-length", "256", "--log-level", "warning"]
    assert main(argv) == 0
    t = launched.topology
    assert t is not None and t.seed == 3
    assert (t.scheduler.mem_fraction, t.scheduler.enable_prefix_cache) == (0.5, False)
    assert (t.scheduler.chunk_size, t.scheduler.max_batch_tokens) == (64, 512)
    assert t.scheduler.max_context_len == 256


def test_a_parallel_size_other_than_one_is_refused_by_name(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["launch", "--model", str(tiny_llama), "--dp-size", "2"]) == 2
    assert "dp_size=2 is invalid: expected 1" in capsys.readouterr().err


def test_tp_size_sets_every_workers_tensor_parallel_degree(
    tiny_llama: Path, launched: type[LaunchedTopology]
) -> None:
    argv = ["launch", "--model", str(tiny_llama), "--device", "cpu", "--tp-size", "2"]
    assert main([*argv, "--mixed"]) == 0
    t = launched.topology
    assert t is not None and [w.tp for w in t.mixed] == [2]
    assert t.engine_config(t.workers()[0]).tp_size == 2
    assert main(argv) == 0  # prefill + decode: both tp 2
    t = launched.topology
    assert [w.tp for w in (*t.prefill, *t.decode)] == [2, 2]
