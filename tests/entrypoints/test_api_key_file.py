"""`--api-key-file` (and $PDSERVE_API_KEY) keep the API key out of `ps`; the file wins over the
environment, and a clash with the topology's router.api_key is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.entrypoints import launch_cli
from pdserve.entrypoints.cli import main


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The Cluster `pdserve launch` would start (not started), instead of serving it."""
    clusters: list[Any] = []

    def fake_serve(cluster: Any, grace_s: float) -> int:
        clusters.append(cluster)
        cluster.stop(grace_s=0)  # nothing started; removes its socket folder
        return 0

    monkeypatch.setattr(launch_cli, "_serve", fake_serve)
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    return clusters


def _key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "api-key"
    path.write_text(text)
    return path


def test_the_key_file_sets_the_routers_key(tmp_path: Path, tiny_llama: Path, served) -> None:
    key_file = _key_file(tmp_path, "sk-from-file\n")
    argv = ["launch", "--model", str(tiny_llama), "--device", "cpu", "--api-key-file"]
    assert main([*argv, str(key_file)]) == 0
    assert served[0].topology.router.api_key == "sk-from-file"


def test_the_environment_gives_the_key_when_no_file_does(
    tiny_llama: Path, served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "sk-from-env")
    assert main(["launch", "--model", str(tiny_llama), "--device", "cpu"]) == 0
    assert served[0].topology.router.api_key == "sk-from-env"


def test_a_topology_takes_the_key_file_unless_it_sets_a_key_itself(
    tmp_path: Path, tiny_llama: Path, served, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = _key_file(tmp_path, "sk-from-file")
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"model: {tiny_llama}\ndevice: cpu\n")
    assert main(["launch", "--topology", str(plain), "--api-key-file", str(key_file)]) == 0
    assert served[0].topology.router.api_key == "sk-from-file"
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(f"model: {tiny_llama}\ndevice: cpu\nrouter: {{api_key: sk-in-topology}}\n")
    assert main(["launch", "--topology", str(keyed), "--api-key-file", str(key_file)]) == 2
    assert "expected one" in capsys.readouterr().err


def test_an_empty_or_missing_key_file_is_refused_by_name(
    tmp_path: Path, tiny_llama: Path, served, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["launch", "--model", str(tiny_llama), "--api-key-file"]
    assert main([*argv, str(_key_file(tmp_path, "\n  \n"))]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "missing")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert not served


def test_api_key_and_api_key_file_are_exclusive(tmp_path: Path, tiny_llama: Path) -> None:
    key_file = str(_key_file(tmp_path, "k"))
    with pytest.raises(SystemExit):
        main(["launch", "--model", str(tiny_llama), "--api-key", "k", "--api-key-file", key_file])
