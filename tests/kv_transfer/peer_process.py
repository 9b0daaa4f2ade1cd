"""Runs kv_peer.py in a child process while the test process polls its receiver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

from pdserve.kv_transfer import KVReceiver

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _load_peer_module() -> Any:
    spec = importlib.util.spec_from_file_location("kv_peer", HERE / "kv_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_pool = _load_peer_module().make_pool


def run_sender_process(
    tmp_path: Path,
    receiver: KVReceiver,
    *,
    backend: str,
    device: str,
    seed: int,
    shape: list[int],
    dtype: torch.dtype,
    transfers: list[tuple[str, list[int], list[int]]],
    wait_for: set[str],
    timeout_s: float = 30.0,
    more_receivers: tuple[KVReceiver, ...] = (),
    batches: list[list[tuple[str, int, list[int], list[int]]]] | None = None,
) -> tuple[set[str], dict]:
    """Start the sender process, poll `receiver` until it exits and `wait_for` rids arrived.
    more_receivers: decode 1, 2, ... (polled too); batches: each sent with one send_many after
    the transfers. Returns (rids poll() reported, the sender's report: stats, outcomes)."""
    handshake_paths = []
    for i, r in enumerate((receiver, *more_receivers)):
        handshake_paths.append(tmp_path / f"handshake{i}.msgpack")
        handshake_paths[-1].write_bytes(msgpack.packb(r.handshake(), use_bin_type=True))
    spec_path = tmp_path / "spec.json"
    spec = {
        "backend": backend,
        "device": device,
        "seed": seed,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "handshake_path": str(handshake_paths[0]),
        "handshake_paths": [str(p) for p in handshake_paths],
        "transfers": [list(t) for t in transfers],
        "batches": [[list(t) for t in batch] for batch in batches or []],
        "timeout_s": timeout_s,
    }
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "kv_peer.py"), str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    arrived: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for r in (receiver, *more_receivers):
                arrived.update(r.poll())
            if proc.poll() is not None and (wait_for <= arrived or proc.returncode != 0):
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"sender process failed ({proc.returncode}):\n{err.decode()[-4000:]}")
    return arrived, json.loads(out.decode().strip().splitlines()[-1])
