"""The examples' server helper: a running server's URL passes through; with --launch a cluster
is started on its port with the given topology options (the real start is run by
tests/test_examples.py's --launch examples), its data dir a temporary folder when asked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from pdserve.entrypoints import example_server as helper
from pdserve.entrypoints import launch


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    helper.add_server_args(parser)
    return parser.parse_args(list(argv))


def test_a_running_server_passes_through() -> None:
    args = parse("--base-url", "http://10.0.0.1:9000")
    with helper.example_server(args) as url:
        assert url == "http://10.0.0.1:9000"
    assert parse().base_url == helper.DEFAULT_BASE_URL and parse().device == "auto"


def test_launch_starts_a_cluster_with_the_options_and_a_temporary_data_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    class FakeCluster:
        def __init__(self, topology: Any, log_level: str) -> None:
            seen["topology"] = topology
            self.url = "http://127.0.0.1:9123"

        def __enter__(self) -> FakeCluster:
            seen["data_dir_exists"] = Path(seen["kw"]["router"]["data_dir"]).is_dir()
            return self

        def __exit__(self, *exc: object) -> None:
            seen["exited"] = True

    def for_model(model: str, **kw: Any) -> str:
        seen["model"], seen["kw"] = model, kw
        return "topology"

    monkeypatch.setattr(launch, "Cluster", FakeCluster)
    monkeypatch.setattr("pdserve.config.topology.Topology.for_model", for_model)
    args = parse("--launch", "--base-url", "http://127.0.0.1:9123", "--model", "/m", "--device",
                 "cpu")  # fmt: skip
    with helper.example_server(args, temp_data_dir=True, is_embedding=True) as url:
        assert url == "http://127.0.0.1:9123"
    assert seen["model"] == "/m" and seen["data_dir_exists"] and seen["exited"]
    kw = seen["kw"]
    assert (kw["mode"], kw["device"], kw["port"], kw["is_embedding"]) == ("pd", "cpu", 9123, True)
    assert not Path(kw["router"]["data_dir"]).exists()  # removed afterwards
