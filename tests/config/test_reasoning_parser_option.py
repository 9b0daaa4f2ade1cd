"""`router.reasoning_parser` in the topology and `--reasoning-parser` on `pdserve launch`: checked
by name, carried into the router's spec."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.config.router_spec import REASONING_PARSERS
from pdserve.config.topology import Topology
from pdserve.config.topology_sections import RouterConfig
from pdserve.entrypoints.launch_cli import _with_router_environment


def test_a_parser_name_pdserve_lacks_is_refused_naming_the_key() -> None:
    assert RouterConfig(reasoning_parser="qwen3").reasoning_parser == "qwen3"
    with pytest.raises(ValueError, match="reasoning_parser='r1'.*deepseek_r1"):
        RouterConfig(reasoning_parser="r1")


def test_the_flag_sets_the_router_section(tiny_llama: Path) -> None:
    topology = Topology.for_model(str(tiny_llama), mode="mixed", device="cpu")
    assert topology.router.reasoning_parser is None
    for name in REASONING_PARSERS:
        args = argparse.Namespace(data_dir=None, port=8000, reasoning_parser=name)
        assert _with_router_environment(topology, args).router.reasoning_parser == name
    from_file = Topology.for_model(
        str(tiny_llama), mode="mixed", device="cpu", router={"reasoning_parser": "deepseek_r1"}
    )
    assert from_file.router.reasoning_parser == "deepseek_r1"
