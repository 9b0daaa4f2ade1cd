"""The launcher's restart policy: backoff that doubles, a cap within a window, and the callbacks."""

from __future__ import annotations

import subprocess
from typing import Any

from pdserve.config.topology_sections import SupervisionConfig
from pdserve.entrypoints.supervisor import MAX_BACKOFF_S, Child, Supervisor, restart_delay


class _Proc:
    """A stand-in Popen: running until `exit(code)`."""

    _next_pid = 1000

    def __init__(self) -> None:
        _Proc._next_pid += 1
        self.pid = _Proc._next_pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def exit(self, code: int) -> None:
        self.returncode = code


def _child(proc: Any) -> Child:
    return Child("decode0", "worker", proc, "ipc://d0", spec={"name": "decode0"})


def test_restart_delay_doubles_within_the_window_and_stops_at_the_cap() -> None:
    config = SupervisionConfig(max_restarts=3, restart_window_s=100.0, restart_backoff_s=1.0)
    assert restart_delay(config, [], now=0.0) == 1.0
    assert restart_delay(config, [10.0], now=11.0) == 2.0
    assert restart_delay(config, [10.0, 20.0], now=21.0) == 4.0
    assert restart_delay(config, [10.0, 20.0, 30.0], now=31.0) is None
    assert restart_delay(config, [10.0, 20.0, 30.0], now=115.0) == 4.0  # the first left the window
    many = SupervisionConfig(max_restarts=50, restart_backoff_s=1.0)
    assert restart_delay(many, [0.0] * 20, now=1.0) == MAX_BACKOFF_S
    assert restart_delay(SupervisionConfig(max_restarts=0), [], now=0.0) is None


def test_supervisor_reports_an_exit_then_restarts_after_the_backoff() -> None:
    config = SupervisionConfig(max_restarts=1, restart_backoff_s=2.0)
    exits: list[tuple[str, bool]] = []
    respawned: list[dict[str, Any]] = []

    def respawn(child: Child) -> subprocess.Popen:
        respawned.append(child.spec)
        return _Proc()  # type: ignore[return-value]

    supervisor = Supervisor(config, respawn, lambda c, again: exits.append((c.name, again)))
    child = _child(_Proc())
    supervisor.poll([child], now=0.0)
    assert exits == [] and respawned == []  # running: nothing to do
    child.proc.exit(-9)
    supervisor.poll([child], now=1.0)
    assert exits == [("decode0", True)] and child.restart_at == 3.0
    supervisor.poll([child], now=2.9)
    assert respawned == []  # still backing off
    supervisor.poll([child], now=3.0)
    assert respawned == [{"name": "decode0"}] and child.is_running and child.restarts == [3.0]
    child.proc.exit(1)  # the cap of one restart is used up
    supervisor.poll([child], now=4.0)
    assert exits[-1] == ("decode0", False) and child.is_given_up
    supervisor.poll([child], now=100.0)
    assert len(exits) == 2 and len(respawned) == 1  # reported once, never restarted again
