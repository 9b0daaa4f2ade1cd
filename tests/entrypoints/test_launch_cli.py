"""The launch command refuses what it cannot do with a message, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

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
