"""Running a benchmark script (benchmarks/gpu/*.py) in the test process: its `main(argv)` with the
command line the test gives, as `python SCRIPT ARGV` would run it, less the seconds a process of
its own spends importing torch and transformers. What the script changes in this process for
its children (sys.path, $PYTHONPATH, $TQDM_DISABLE) is put back afterwards."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest


class ScriptRun(NamedTuple):
    returncode: int
    stdout: str


def run_script_main(script: Path, argv: list[str], out_dir: Path | None = None) -> ScriptRun:
    """`main` of `script`, loaded under a name of its own, with `argv` as its command line (its
    argument, or sys.argv for a main() that takes none); its exit code (None: 0) and what it
    printed. $OUT is `out_dir` while it runs (unset without one)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        mp.setattr(sys, "argv", [str(script), *argv])
        for name in ("PYTHONPATH", "TQDM_DISABLE"):  # the scripts set them for their children
            if name in os.environ:
                mp.setenv(name, os.environ[name])
            else:  # recorded as unset, so that it is unset again afterwards
                mp.setenv(name, "")
                mp.delenv(name)
        if out_dir is None:
            mp.delenv("OUT", raising=False)
        else:
            mp.setenv("OUT", str(out_dir))
        spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
        assert spec is not None and spec.loader is not None, script
        module = importlib.util.module_from_spec(spec)
        with contextlib.redirect_stdout(out):
            spec.loader.exec_module(module)
            takes_argv = bool(inspect.signature(module.main).parameters)
            code = module.main(argv) if takes_argv else module.main()
    return ScriptRun(code or 0, out.getvalue())
