"""`pdserve worker` (entrypoints/worker_cli.py): the flags become the WorkerSpec of a worker that
joins a router, and what cannot work is refused before the model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.entrypoints.cli import build_parser, main
from pdserve.entrypoints.worker_cli import worker_spec


def _args(model: Path, *extra: str) -> list[str]:
    return ["worker", "--router", "tcp://10.0.0.1:8001", "--model", str(model), *extra]


def test_a_decode_worker_binds_and_announces_its_host(tiny_llama: Path) -> None:
    args = build_parser().parse_args(
        _args(
            tiny_llama,
            "--role",
            "decode",
            "--host",
            "10.0.0.7",
            "--port",
            "9100",
            "--name",
            "d-7",
            "--device",
            "cpu",
            "--num-pages",
            "64",
            "--page-size",
            "4",
            "--fault-injection",
            '{"step_delay_s": 0.01}',
        )  # fmt: skip
    )
    spec = worker_spec(args)
    assert (spec.name, spec.role, spec.inbox) == ("d-7", "decode", "tcp://10.0.0.7:9100")
    assert spec.router_inbox == "tcp://10.0.0.1:8001" and spec.tokenizer_inboxes == ()
    assert (spec.kv.backend, spec.kv.address, spec.kv.host) == (
        "tcp",
        "tcp://10.0.0.7:*",
        "10.0.0.7",
    )
    assert (spec.engine.scheduler.num_pages, spec.engine.scheduler.page_size) == (64, 4)
    assert spec.engine.device == "cpu" and spec.fault_injection.step_delay_s == 0.01
    assert not spec.engine.speculative.enabled


def test_the_engine_flags_of_launch_apply_to_the_workers_role(tiny_llama: Path) -> None:
    flags = ("--device", "cpu", "--speculative-algorithm", "NGRAM", "--max-running-requests", "3")
    decode = worker_spec(build_parser().parse_args(_args(tiny_llama, "--role", "decode", *flags)))
    assert decode.engine.speculative.enabled  # speculation runs on the decode side
    assert decode.engine.scheduler.max_running_requests == 3
    mixed = worker_spec(build_parser().parse_args(_args(tiny_llama, "--role", "mixed", *flags)))
    assert mixed.role == "mixed" and mixed.engine.speculative.enabled


def test_a_prefill_worker_takes_a_free_port_and_no_kv_socket(tiny_llama: Path) -> None:
    spec = worker_spec(build_parser().parse_args(_args(tiny_llama, "--role", "prefill")))
    assert spec.inbox == "tcp://127.0.0.1:*" and spec.kv.address is None
    assert spec.name.startswith("prefill-")


def test_what_cannot_work_is_refused_naming_it(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PDSERVE_CLUSTER_SECRET", raising=False)
    assert main(_args(tiny_llama, "--role", "decode")) == 2
    assert "PDSERVE_CLUSTER_SECRET is not set" in capsys.readouterr().err
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "a-secret-for-the-worker-cli-test")
    assert main(_args(tiny_llama, "--role", "decode", "--router", "ipc:///tmp/r")) == 2
    assert "expected tcp://HOST:PORT" in capsys.readouterr().err
    assert main(_args(tiny_llama, "--role", "decode", "--tp-size", "2")) == 2
    assert "--tp-size > 1 is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: only tcp
        build_parser().parse_args(_args(tiny_llama, "--role", "decode", "--kv-transfer", "nccl"))
