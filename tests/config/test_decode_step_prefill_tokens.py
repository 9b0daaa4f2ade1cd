"""`decode_step_prefill_tokens` reaches the scheduler from each place an option is given: the
topology's `scheduler:` section, the `pdserve launch` flag and the Engine's keyword."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.topology import Topology
from pdserve.entrypoints import launch, launch_cli
from pdserve.entrypoints.cli import main


def test_the_default_caps_prompt_tokens_beside_decodes() -> None:
    assert SchedulerConfig().decode_step_prefill_tokens == 512


def test_the_topology_key_and_the_flat_key_set_it(tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"model: {tiny_llama}\nscheduler: {{decode_step_prefill_tokens: 256}}\n")
    assert Topology.from_yaml(path).scheduler.decode_step_prefill_tokens == 256
    flat = Topology.for_model(str(tiny_llama), mode="mixed", decode_step_prefill_tokens=0)
    assert flat.scheduler.decode_step_prefill_tokens == 0
    with pytest.raises(ValueError, match=r"scheduler\.decode_step_prefill_tokens=-5"):
        Topology.from_dict(
            {"model": str(tiny_llama), "scheduler": {"decode_step_prefill_tokens": -5}}
        )


def test_the_launch_flag_sets_it(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Topology] = []

    class Launched:
        def __init__(self, topology: Topology, **kwargs: Any) -> None:
            seen.append(topology)

    monkeypatch.setattr(launch, "Cluster", Launched)
    monkeypatch.setattr(launch_cli, "_serve", lambda cluster, grace_s: 0)
    argv = ["launch", "--model", str(tiny_llama), "--device", "cpu"]
    assert main([*argv, "--decode-step-prefill-tokens", "768", "--log-level", "warning"]) == 0
    assert seen[0].scheduler.decode_step_prefill_tokens == 768


def test_the_engine_option_sets_it(tiny_llama: Path) -> None:
    config = EngineConfig.from_options(str(tiny_llama), decode_step_prefill_tokens=128)
    assert config.scheduler.decode_step_prefill_tokens == 128


def test_the_offline_engine_defaults_to_its_throughput_budget(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdserve.entrypoints import engine, process_engine

    built: list[dict[str, Any]] = []

    class Recorded:
        def __init__(self, model_path: str, **options: Any) -> None:
            built.append(options)

    monkeypatch.setattr(process_engine, "ProcessEngine", Recorded)
    offline = engine.Engine(str(tiny_llama), in_process=True, device="cpu")
    assert offline.config.scheduler.decode_step_prefill_tokens == (
        engine.OFFLINE_DECODE_STEP_PREFILL_TOKENS
    )
    assert engine.OFFLINE_DECODE_STEP_PREFILL_TOKENS > SchedulerConfig().decode_step_prefill_tokens
    offline.shutdown()
    kept = engine.Engine(
        str(tiny_llama), in_process=True, device="cpu", decode_step_prefill_tokens=64
    )
    assert kept.config.scheduler.decode_step_prefill_tokens == 64
    kept.shutdown()
    engine.Engine(str(tiny_llama))  # the process engine: the same default reaches its worker
    engine.Engine(str(tiny_llama), decode_step_prefill_tokens=None)  # an unset flag: the default
    engine.Engine(str(tiny_llama), topology="t.yaml")  # a topology's scheduler section decides
    assert [o.get("decode_step_prefill_tokens") for o in built] == [
        engine.OFFLINE_DECODE_STEP_PREFILL_TOKENS,
        engine.OFFLINE_DECODE_STEP_PREFILL_TOKENS,
        None,
    ]
