"""Running the examples from tests: as a process of their own (the server clients, `--launch`),
or as __main__ in the test process with their command line (the Engine examples: a process of
their own would spend most of its time importing torch and transformers)."""

from __future__ import annotations

import gc
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, timeout_s: float = 240) -> str:
    """What examples/<script> printed, run with `args` in a process of its own."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_example_in_process(
    script: str,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """What examples/<script> printed, run as __main__ in this process with `args`."""
    path = EXAMPLES / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        gc.collect()  # the engine's KV pools (reference cycles) go now, not in a later test
    return capsys.readouterr().out
