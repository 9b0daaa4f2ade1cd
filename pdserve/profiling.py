"""`PDSERVE_PROFILE_DIR` (env.py): a process's main loop under cProfile, its statistics written to
`<dir>/<name>.pstats` when the loop returns. A diagnostic; without the variable it costs nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pdserve import env


@contextlib.contextmanager
def profiled(name: str) -> Iterator[None]:
    out_dir = env.profile_dir()
    if out_dir is None:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        out_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(out_dir / f"{name}.pstats"))
