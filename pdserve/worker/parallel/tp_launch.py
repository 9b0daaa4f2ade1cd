"""Rank 0 of a tensor-parallel worker starts its followers (ranks 1..tp-1) and watches them.

| who dies | what happens |
|---|---|
| rank 0 (the worker process) | each follower exits at once (parent-death signal + watchdog) |
| a follower | rank 0's watcher calls `on_lost`: a worker process exits (the launcher and the router see a dead worker); the in-process engine's next step raises instead |
| both stay | rank 0's `stop()` sends STOP (through ModelRunner.close), then waits for them |
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgpack

from pdserve.config.engine_config import EngineConfig
from pdserve.worker.parallel.tp_group import TPGroup, init_tp_group

logger = logging.getLogger(__name__)

_POLL_S = 0.2


class TPFollowers:
    """The follower processes of one worker, seen from rank 0."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs
        self.group: TPGroup | None = None
        self.lost: str | None = None  # why a follower is gone, once one is
        # Called (from the watcher thread) when a follower exits unasked; default: remember it.
        self.on_lost: Callable[[str], None] = self._remember
        self._stopping = False
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)

    @classmethod
    def start(cls, config: EngineConfig) -> TPFollowers:
        """Start ranks 1..tp_size-1 and join them (config: resolved); blocks until all joined."""
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        spec = msgpack.packb(
            {"engine": dataclasses.asdict(config), "init_method": init_method}, use_bin_type=True
        )
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        procs = [_start_follower(rank, spec, log_level) for rank in range(1, config.tp_size)]
        followers = cls(procs)
        followers._watcher.start()  # a follower that fails to start must not leave us waiting
        followers.group = init_tp_group(0, config.tp_size, init_method, config.device)
        return followers

    def check(self) -> None:
        """RuntimeError if a follower is gone: the worker's ranks cannot run a step."""
        if self.lost is not None:
            raise RuntimeError(self.lost)

    def stop(self, timeout_s: float = 10.0) -> None:
        """After the followers were told STOP: wait for them (killing any that linger)."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.group is not None and self.group.comm is not None:
            self.group.comm.close()

    def kill(self) -> None:
        """End the followers without a word (rank 0 failed mid-step: the ranks are out of step)."""
        self._stopping = True
        for proc in self.procs:
            proc.kill()

    def _watch(self) -> None:
        while not self._stopping:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._stopping:
                    self.on_lost(f"tensor-parallel rank {rank} exited with code {code}")
                    return
            time.sleep(_POLL_S)

    def _remember(self, why: str) -> None:
        logger.error("%s", why)
        self.lost = why


def exit_process(why: str) -> None:
    """A worker process's `on_lost`: the worker cannot serve without all its ranks."""
    logger.error("%s: the worker exits", why)
    os._exit(1)


def _start_follower(rank: int, spec: bytes, log_level: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve.worker.parallel.follower", "--rank", str(rank)]
    cmd += ["--parent-pid", str(os.getpid()), "--log-level", log_level]
    # PYTHONSAFEPATH: as the launcher does, so a folder named pdserve in the cwd cannot shadow us.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(spec)
    proc.stdin.close()
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
