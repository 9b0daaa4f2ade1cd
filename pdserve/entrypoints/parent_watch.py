"""Children exit with their launcher: `kill -9` of the launcher must leave no process behind (a
worker holds GPU memory until it exits, a router keeps its port).

Two mechanisms, because either alone has a gap: Linux's parent-death signal (`prctl`) kills the child
at once but fires when the launcher *thread* that spawned it ends, so the launcher spawns from one
thread that lives as long as the cluster; a watchdog thread polling `os.getppid()` covers other
systems and the instant between fork and prctl.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.5


def exit_with_parent(parent_pid: int, poll_s: float = _POLL_S) -> None:
    """Arrange for this process to die as soon as `parent_pid` (the launcher) is gone."""
    armed = _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # gone already, before the signal was armed
        _exit(parent_pid)
    threading.Thread(
        target=_watch, args=(parent_pid, poll_s), name="parent-watch", daemon=True
    ).start()
    logger.debug("exits with the launcher (pid %d; prctl armed: %s)", parent_pid, armed)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    _exit(parent_pid)


def _exit(parent_pid: int) -> None:
    logger.error("the launcher (pid %d) is gone: exiting", parent_pid)
    os._exit(1)
