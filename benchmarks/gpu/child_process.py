"""Runs one of the benchmark's helper scripts in a child process with a time limit, and reads back
the one `RESULT {json}` line it prints. A child that overruns is killed with its whole process
group (torch.compile starts worker processes of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_TAIL_LINES = 15


class ChildFailed(RuntimeError):
    """The child exited non-zero, overran its time limit, or printed no RESULT line."""


def child_env() -> dict[str, str]:
    """This environment, with the repo (for `pdserve`) on the child's import path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}


def start_child(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        start_new_session=True,  # its own process group, so a kill takes its workers too
    )


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def result_of(proc: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    """Wait for the child; its RESULT dict, or ChildFailed with the tail of its output."""
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise ChildFailed(f"timed out after {timeout_s:.0f} s and was killed") from None
    lines = output.splitlines()
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        last = lines[-1] if lines else "(no output)"
        tail = "\n".join(lines[-_TAIL_LINES:])
        raise ChildFailed(f"exit code {proc.returncode}: {last}\noutput ends:\n{tail}")
    return json.loads(results[-1][len("RESULT ") :])


def run_child(script: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    return result_of(start_child(script, args), timeout_s)
