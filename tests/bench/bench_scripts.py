"""Run a script of benchmarks/gpu as its CPU test does: a child process (its --smoke shapes),
its exit status checked, its output returned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def run_script(
    name: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/gpu/<name> *args`, which must exit 0 (env: added to this process's)."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out
