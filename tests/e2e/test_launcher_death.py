"""`kill -9` of the launcher (`pdserve launch`, a process of its own here) leaves no pdserve
process behind: every child exits within 5 s (parent-death signal, or its getppid watchdog)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.entrypoints.launch import _free_port

pytestmark = pytest.mark.slow

GONE_WITHIN_S = 5.0


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _stat(int(entry)) and _stat(int(entry))[1] == pid:
            out.append(int(entry))
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]  # the name may hold spaces and ')'
    return state, int(ppid)


def _is_gone(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")  # a zombie has exited: it holds nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_leaves_no_child_behind(tiny_llama: Path) -> None:
    cmd = [sys.executable, "-m", "pdserve.entrypoints.cli", "--log-level", "warning", "launch",
           "--model", str(tiny_llama), "--mixed", "--device", "cpu", "--port", str(_free_port()),
           "--num-pages", "256"]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:  # blocks until it prints the ready line (or exits)
            if "pdserve is ready at" in line:
                break
        else:
            pytest.fail(f"the launcher exited with code {launcher.wait()} before it was ready")
        children = _children_of(launcher.pid)
        assert len(children) == 3  # router, tokenizer0, mixed0
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while not all(_is_gone(pid) for pid in children):
            assert time.monotonic() < deadline, [p for p in children if not _is_gone(p)]
            time.sleep(0.05)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _children_of(launcher.pid):  # on failure: never leave them running
            os.kill(pid, signal.SIGKILL)
