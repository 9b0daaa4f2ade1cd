"""`pdserve launch`: --data-dir and Vertex AI's AIP_HTTP_PORT reach the router's settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch_cli import _with_router_environment, add_launch_parser


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_launch_parser(parser.add_subparsers())
    return parser.parse_args(["launch", *argv])


def test_data_dir_and_aip_http_port_set_the_router(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIP_HTTP_PORT", "9123")
    args = parse("--model", str(tiny_llama), "--data-dir", str(tmp_path))
    topology = _with_router_environment(Topology.for_model(str(tiny_llama)), args)
    assert topology.router.data_dir == str(tmp_path)
    assert topology.router.port == 9123


def test_port_flag_wins_over_aip_http_port(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIP_HTTP_PORT", "9123")
    args = parse("--model", str(tiny_llama), "--port", "8001")
    topology = _with_router_environment(Topology.for_model(str(tiny_llama), port=8001), args)
    assert topology.router.port == 8001 and topology.router.data_dir is None


def test_a_bad_aip_http_port_is_named(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_HTTP_PORT", "99999")
    args = parse("--model", str(tiny_llama))
    with pytest.raises(ValueError, match="AIP_HTTP_PORT='99999'"):
        _with_router_environment(Topology.for_model(str(tiny_llama)), args)


def test_router_batch_settings_are_checked() -> None:
    from pdserve.config.topology_sections import RouterConfig

    assert RouterConfig().max_running_batch_lines == 8  # the measured default (request_limits.py)
    with pytest.raises(ValueError, match="max_running_batch_lines=0"):
        RouterConfig(max_running_batch_lines=0)
    with pytest.raises(ValueError, match="max_file_bytes"):
        RouterConfig(max_file_bytes=-1)
