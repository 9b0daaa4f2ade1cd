"""KV page transfer between two processes (decode pool here, prefill pool in a child) for several
transfer sizes: wall time of `KVSender.send` (page gather + copy + scatter, and its overheads)
against the device copy bandwidth.

ratio = (2 x payload bytes / seconds) / copy bandwidth: the time one device copy of the payload
would take (it reads and writes each byte once) over the time the transfer took; 1.0 is as fast as
a plain copy.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
from child_process import result_of, start_child


@dataclass(frozen=True)
class PageLayout:
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * elem

    def pool_shape(self, num_pages: int) -> list[int]:  # [L, 2, num_pages, page_size, Hkv, D]
        return [self.num_layers, 2, num_pages, self.page_size, self.num_kv_heads, self.head_dim]


def _plan(
    sizes: list[int], layout: PageLayout, num_pages: int, warmup: int, repeats: int
) -> list[list[Any]]:
    """[[rid, label, src_pages, dst_pages, is_timed], ...]: scattered pages, as a real pool has."""
    rnd = random.Random(0)
    transfers = []
    for size in sizes:
        n = max(1, size // layout.bytes_per_page)
        for i in range(warmup + repeats):
            src = rnd.sample(range(1, num_pages), n)
            dst = rnd.sample(range(1, num_pages), n)
            transfers.append([f"{size}-{i}", str(size), src, dst, i >= warmup])
    return transfers


def measure_kv_transfer(
    backend: str,
    device: str,
    layout: PageLayout,
    sizes: list[int],
    copy_bw: float,
    work_dir: Path,
    warmup: int = 3,
    repeats: int = 10,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    from pdserve.kv_transfer import make_receiver

    num_pages = 2 * max(max(1, s // layout.bytes_per_page) for s in sizes) + 1
    dst = torch.zeros(layout.pool_shape(num_pages), dtype=layout.dtype, device=device)
    receiver = make_receiver(backend, dst)
    transfers = _plan(sizes, layout, num_pages, warmup, repeats)
    for rid, _, _, dst_pages, _ in transfers:
        receiver.expect(rid, dst_pages)
    work_dir.mkdir(parents=True, exist_ok=True)
    handshake_path = work_dir / "kv_handshake.msgpack"
    handshake_path.write_bytes(msgpack.packb(receiver.handshake(), use_bin_type=True))
    spec = {
        "backend": backend,
        "device": device,
        "shape": layout.pool_shape(num_pages),
        "dtype": str(layout.dtype).removeprefix("torch."),
        "seed": 1,
        "handshake_path": str(handshake_path),
        "timeout_s": timeout_s,
        "transfers": transfers,
    }
    spec_path = work_dir / "kv_spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = start_child("kv_sender.py", [str(spec_path)])
    arrived = _poll_until_exit(receiver, proc, {t[0] for t in transfers}, timeout_s)
    result = result_of(proc, timeout_s=10)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    landed = float(dst[:, :, transfers[-1][3]].double().sum())
    receiver.close()
    return {
        "backend": backend,
        "bytes_per_page": layout.bytes_per_page,
        "checksum_matches": abs(landed - result["checksum"]) <= 1e-6 * max(1.0, abs(landed)),
        "num_arrived_reported": len(arrived),
        "sizes": [_size_row(size, result, copy_bw) for size in sizes],
    }


def _poll_until_exit(receiver: Any, proc: Any, rids: set[str], timeout_s: float) -> set[str]:
    """Drain the receiver while the sender runs (tcp lands bytes here), then until every rid
    has landed (backends that report arrivals) or a short grace period ends."""
    arrived: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        arrived.update(receiver.poll())
        time.sleep(0.0005)
    grace = time.monotonic() + 10.0
    while receiver.needs_arrival and arrived != rids and time.monotonic() < grace:
        arrived.update(receiver.poll())
        time.sleep(0.001)
    return arrived


def _size_row(size: int, result: dict[str, Any], copy_bw: float) -> dict[str, Any]:
    key = str(size)
    seconds = statistics.median(result["seconds"][key])
    payload = result["bytes"][key]
    return {
        "size_bytes": payload,
        "median_ms": seconds * 1e3,
        "payload_gb_s": payload / seconds / 1e9,
        "ratio_to_copy": 2 * payload / seconds / copy_bw,
    }
