"""`pdserve tokenizer` (entrypoints/tokenizer_cli.py): the flags become the TokenizerSpec of a
tokenizer that joins a router, and what cannot work is refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.entrypoints.cli import build_parser, main
from pdserve.entrypoints.tokenizer_cli import tokenizer_spec


def _args(model: Path | str, *extra: str) -> list[str]:
    return ["tokenizer", "--router", "tcp://10.0.0.1:8001", "--model", str(model), *extra]


def test_a_tokenizer_binds_and_announces_its_host(tiny_llama: Path) -> None:
    flags = ("--host", "10.0.0.8", "--port", "9200", "--name", "tok-8",
             "--heartbeat-interval-s", "0.5", "--max-context-len", "512")  # fmt: skip
    spec = tokenizer_spec(build_parser().parse_args(_args(tiny_llama, *flags)))
    assert (spec.name, spec.inbox, spec.router_inbox) == (
        "tok-8",
        "tcp://10.0.0.8:9200",
        "tcp://10.0.0.1:8001",
    )
    assert spec.worker_inboxes == () and spec.launcher_inbox is None  # from the PeerTable
    assert (spec.heartbeat_interval_s, spec.max_context_len) == (0.5, 512)


def test_a_tokenizer_takes_a_free_port_and_a_name_of_its_own(tiny_llama: Path) -> None:
    spec = tokenizer_spec(build_parser().parse_args(_args(tiny_llama)))
    assert spec.inbox == "tcp://127.0.0.1:*" and spec.name.startswith("tokenizer-")
    assert spec.max_context_len == 0  # the model's own; the router's limit applies too


def test_what_cannot_work_is_refused_naming_it(
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    assert main(_args(tiny_llama)) == 2
    assert "PDSERVE_CLUSTER_SECRET is not set" in capsys.readouterr().err
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "a-secret-for-the-tokenizer-cli-test")
    assert main(_args(tiny_llama, "--router", "ipc:///tmp/r")) == 2
    assert "expected tcp://HOST:PORT" in capsys.readouterr().err
    assert main(_args(tmp_path / "nowhere")) == 2
    assert "expected a model directory" in capsys.readouterr().err
    assert main(_args(tiny_llama, "--max-context-len", "-1")) == 2
    assert "--max-context-len -1 is invalid" in capsys.readouterr().err
