"""LoRA options under SGLang's names: CLI flags, the topology's `lora:` section, Engine options,
and the worker spec's round trip; bad values are refused naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.config.engine_config import EngineConfig
from pdserve.config.lora_config import LORA_TARGET_MODULES, LoraConfig, LoraRef, lora_names_for
from pdserve.config.topology import Topology
from pdserve.entrypoints.launch_cli import _overrides, add_launch_parser


def test_cli_flags_reach_the_topology_and_each_worker(tiny_llama: Path) -> None:
    parser = argparse.ArgumentParser()
    add_launch_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["launch", "--model", str(tiny_llama), "--lora-paths", "sql=/a/sql", "/b/chat",
         "--max-loras-per-batch", "3", "--max-lora-rank", "32", "--lora-target-modules", "all"]
    )  # fmt: skip
    topology = Topology.for_model(str(tiny_llama), device="cpu", **_overrides(args))
    lora = topology.engine_config().lora
    assert lora.lora_paths == (LoraRef("sql", "/a/sql"), LoraRef("chat", "/b/chat"))
    assert (lora.max_loras_per_batch, lora.max_lora_rank) == (3, 32)
    assert lora.lora_target_modules == LORA_TARGET_MODULES
    assert Topology.from_dict(topology.to_dict(redact=False)) == topology


def test_topology_lora_section_and_engine_options(tiny_llama: Path) -> None:
    topology = Topology.from_dict(
        {"model": str(tiny_llama), "device": "cpu",
         "lora": {"lora_paths": {"sql": "/a/sql"}, "max_loras_per_batch": 2}}
    )  # fmt: skip
    assert topology.lora == LoraConfig((LoraRef("sql", "/a/sql"),), max_loras_per_batch=2)
    config = EngineConfig.from_options(str(tiny_llama), lora_paths=["x=/y"], max_lora_rank=4)
    assert config.lora.enabled and config.lora.max_lora_rank == 4
    assert not EngineConfig(str(tiny_llama)).lora.enabled


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"lora_paths": ["a=/x", "a=/y"]}, "appear twice"),
        ({"lora_paths": ["=/x"]}, "NAME=PATH"),
        ({"max_loras_per_batch": 0}, "max_loras_per_batch=0"),
        ({"lora_target_modules": ["lm_head"]}, "lm_head"),
    ],
)
def test_bad_lora_options_are_refused_naming_them(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LoraConfig.from_options(options)


def test_topology_refuses_an_unknown_lora_key(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="lora: unknown key"):
        Topology.from_dict({"model": str(tiny_llama), "lora": {"max_loras": 2}})


def test_lora_path_aligns_with_prompts() -> None:
    assert lora_names_for("a", 2) == ["a", "a"]
    assert lora_names_for(["a", None], 2) == ["a", None]
    with pytest.raises(ValueError, match="a list of 3"):
        lora_names_for(["a"], 3)
