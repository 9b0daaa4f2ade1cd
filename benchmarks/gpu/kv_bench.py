"""KV page transfer between two processes (decode pool here, prefill pool in a child) for several
transfer sizes: wall time of `KVSender.send` (page checks, page-id upload, the copy, the wait for it)
against a plain device copy of the same number of bytes, timed in the same child process.

    python benchmarks/gpu/kv_bench.py [--sizes-mib 1,4,16,64,256] [--profile] [--json OUT.json]

Correctness first: a transfer of each size and a send_many batch land in pages nothing else
writes, and every one of them is compared bit for bit with the source pages (rebuilt here from the
child's seed) before any number is printed.

% of copy = (time of a device copy of the payload's bytes) / (time of the transfer): 100% would be
a transfer as fast as one `copy_` of the same size (both read and write each byte once).
ratio_to_copy (for run_gpu_bench) = (2 x payload bytes / seconds) / copy_bw, copy_bw the rate of
the 1 GiB copy measured there.
"""

from __future__ import annotations

import argparse
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
from kv_sender import fill_pool

SEED = 1
NUM_BATCHED = 8  # requests per send_many batch


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


LLAMA_1B = PageLayout(16, 16, 8, 64, torch.bfloat16)  # 512 KiB pages


@dataclass(frozen=True)
class Plan:
    """Which pages every transfer uses. The dst pool has a check region (each checked transfer
    gets pages of its own there) and a timed region (everything else writes only there)."""

    num_src_pages: int
    num_dst_pages: int
    checks: list[list[Any]]  # [[rid, src_pages, dst_pages], ...], one send each
    check_batch: list[list[Any]]  # the same, one send_many
    transfers: list[list[Any]]  # [[rid, label, src_pages, dst_pages, is_timed], ...]
    batches: list[list[Any]]  # [[label, [[rid, src_pages, dst_pages], ...], is_timed], ...]
    scratch_pages: list[int]  # [src page, dst page] the profile may write


def pages_for(size: int, layout: PageLayout) -> int:
    return max(1, size // layout.bytes_per_page)


def make_plan(sizes: list[int], layout: PageLayout, warmup: int, repeats: int) -> Plan:
    """Scattered pages, as a real pool has them."""
    rnd = random.Random(0)
    counts = [pages_for(s, layout) for s in sizes]
    num_src = 2 * max(counts) + 1
    batch_counts = [1, 2, 3]
    num_checked = sum(counts) + sum(batch_counts)
    num_dst = num_checked + num_src
    check_dst = rnd.sample(range(num_checked), num_checked)
    timed = range(num_checked, num_dst)  # the timed region of the dst pool

    def take(n: int) -> list[int]:
        taken = check_dst[:n]
        del check_dst[:n]
        return taken

    checks = [[f"check-{s}", rnd.sample(range(num_src), n), take(n)] for s, n in zip(sizes, counts)]
    check_batch = [
        [f"check-batch-{n}", rnd.sample(range(num_src), n), take(n)] for n in batch_counts
    ]
    transfers = []
    for label, n in [("1 page", 1), *((str(s), n) for s, n in zip(sizes, counts))]:
        for i in range(warmup + repeats):
            src, dst = rnd.sample(range(num_src), n), rnd.sample(timed, n)
            transfers.append([f"{label}-{i}", label, src, dst, i >= warmup])
    batches = []
    small = [
        (str(s), c) for s, c in zip(sizes, counts) if s <= 4 << 20 and c * NUM_BATCHED <= num_src
    ]
    for label, n in [("1 page", 1), *small]:
        dst = rnd.sample(timed, NUM_BATCHED * n)
        items = [[f"b{label}-{j}", rnd.sample(range(num_src), n), dst[j * n : (j + 1) * n]]
                 for j in range(NUM_BATCHED)]  # fmt: skip
        batches.append([label, items, True])
    return Plan(num_src, num_dst, checks, check_batch, transfers, batches, [0, timed[0]])


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
    profile: bool = False,
) -> dict[str, Any]:
    from pdserve.kv_transfer import make_receiver

    plan = make_plan(sizes, layout, warmup, repeats)
    dst = torch.zeros(layout.pool_shape(plan.num_dst_pages), dtype=layout.dtype, device=device)
    receiver = make_receiver(backend, dst)
    for rid, *_, dst_pages in [*plan.checks, *plan.check_batch]:
        receiver.expect(rid, dst_pages)
    for rid, _, _, dst_pages, _ in plan.transfers:
        receiver.expect(rid, dst_pages)
    for _, items, _ in plan.batches:  # sent many times: only what tcp needs to land them once
        for rid, _, dst_pages in items:
            receiver.expect(rid, dst_pages)
    work_dir.mkdir(parents=True, exist_ok=True)
    handshake_path = work_dir / "kv_handshake.msgpack"
    handshake_path.write_bytes(msgpack.packb(receiver.handshake(), use_bin_type=True))
    spec = {
        "backend": backend,
        "device": device,
        "shape": layout.pool_shape(plan.num_src_pages),
        "dtype": str(layout.dtype).removeprefix("torch."),
        "seed": SEED,
        "handshake_path": str(handshake_path),
        "timeout_s": timeout_s,
        "checks": plan.checks,
        "check_batch": plan.check_batch,
        "transfers": plan.transfers,
        "batches": plan.batches if backend == "cuda_ipc" else [],
        "copy_sizes": sizes,
        "profile": profile,
        "scratch_pages": plan.scratch_pages,
    }
    spec_path = work_dir / "kv_spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = start_child("kv_sender.py", [str(spec_path)])
    checked = {rid for rid, *_ in [*plan.checks, *plan.check_batch]}
    arrived = _poll_until_exit(receiver, proc, checked, timeout_s)
    result = result_of(proc, timeout_s=10)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    exact = _landed_exactly(dst, layout, plan, device)
    receiver.close()
    sizes_out = [_size_row(size, result, copy_bw) for size in sizes]
    return {
        "backend": backend,
        "bytes_per_page": layout.bytes_per_page,
        "exact": exact,
        "checksum_matches": all(exact.values()),
        "num_arrived_reported": len(arrived),
        "sizes": sizes_out,
        "fixed_cost_ms": statistics.median(result["seconds"]["1 page"]) * 1e3,
        "batches": result.get("batches", {}),
        "profile": result.get("profile"),
        "kernel_configs": result.get("kernel_configs"),
    }


def _landed_exactly(
    dst: torch.Tensor, layout: PageLayout, plan: Plan, device: str
) -> dict[str, bool]:
    """Each checked transfer's dst pages against the child's source pages, bit for bit."""
    src = torch.empty(layout.pool_shape(plan.num_src_pages), dtype=layout.dtype, device=device)
    fill_pool(src, SEED)
    out = {}
    for rid, src_pages, dst_pages in [*plan.checks, *plan.check_batch]:
        landed, sent = dst[:, :, dst_pages], src[:, :, src_pages]
        out[rid] = torch.equal(landed.view(torch.uint8), sent.view(torch.uint8))
    return out


def _poll_until_exit(receiver: Any, proc: Any, rids: set[str], timeout_s: float) -> set[str]:
    """Drain the receiver while the sender runs (tcp lands bytes here), then until every checked
    rid has landed (backends that report arrivals) or a short grace period ends."""
    arrived: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        arrived.update(receiver.poll())
        time.sleep(0.0005)
    grace = time.monotonic() + 10.0
    while receiver.needs_arrival and not rids <= arrived and time.monotonic() < grace:
        arrived.update(receiver.poll())
        time.sleep(0.001)
    return arrived


def _size_row(size: int, result: dict[str, Any], copy_bw: float) -> dict[str, Any]:
    key = str(size)
    seconds = statistics.median(result["seconds"][key])
    payload = result["bytes"][key]
    copy_s = result["copy_seconds"][key]
    kernel_s = result.get("kernel_seconds", {}).get(key)
    return {
        "size_bytes": payload,
        "median_ms": seconds * 1e3,
        "payload_gb_s": payload / seconds / 1e9,
        "ratio_to_copy": 2 * payload / seconds / copy_bw,
        "copy_ms": copy_s * 1e3,
        "pct_of_copy": copy_s / seconds,
        "kernel_ms": None if kernel_s is None else kernel_s * 1e3,
        "kernel_pct_of_copy": None if kernel_s is None else copy_s / kernel_s,
    }


def print_report(r: dict[str, Any], layout: PageLayout) -> None:
    bad = [rid for rid, ok in r["exact"].items() if not ok]
    print(f"correctness: {len(r['exact'])} checked transfers (each size once, a send_many of 3), "
          f"bit-exact: {'all' if not bad else 'NO: ' + ', '.join(bad)}")  # fmt: skip
    print(f"\n{r['backend']}, {layout.bytes_per_page >> 10} KiB pages "
          f"({layout.num_layers} layers, page {layout.page_size}, {layout.num_kv_heads} KV heads x "
          f"{layout.head_dim}, {str(layout.dtype).removeprefix('torch.')}); medians")  # fmt: skip
    print("| size | send() wall | payload GB/s | same-size copy (device) | copy rate, r+w "
          "| % of copy | kernel alone (device) | kernel % of copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in r["sizes"]:
        kernel = "-" if row["kernel_ms"] is None else f"{row['kernel_ms'] * 1e3:.1f} us"
        kernel_pct = "-" if row["kernel_ms"] is None else f"{row['kernel_pct_of_copy']:.0%}"
        copy_rate = 2 * row["size_bytes"] / (row["copy_ms"] / 1e3) / 1e12
        print(f"| {row['size_bytes'] / 2**20:g} MiB | {row['median_ms'] * 1e3:.1f} us "
              f"| {row['payload_gb_s']:.1f} | {row['copy_ms'] * 1e3:.1f} us | {copy_rate:.2f} TB/s "
              f"| {row['pct_of_copy']:.0%} | {kernel} | {kernel_pct} |")  # fmt: skip
    fixed_us = r["fixed_cost_ms"] * 1e3
    print(f"\nfixed cost (send() of 1 page, {layout.bytes_per_page >> 10} KiB): {fixed_us:.1f} us "
          f"(target <= 50 us: {'met' if fixed_us <= 50 else 'missed'})")  # fmt: skip
    big = [row for row in r["sizes"] if row["size_bytes"] >= 16 << 20]
    if big:
        pcts = [row["pct_of_copy"] for row in big]
        shown = ", ".join(f"{p:.0%}" for p in pcts)
        print(f"% of copy >= 50% from 16 MiB: {'met' if min(pcts) >= 0.5 else 'missed'} ({shown})")
    for label, b in r["batches"].items():
        what = "page" if label == "1 page" else f"{int(label) / 2**20:g} MiB"
        print(
            f"{b['num_transfers']} requests x 1 {what}: one send_many "
            f"{b['send_many_s'] * 1e6:.1f} us, one send each {b['send_each_s'] * 1e6:.1f} us"
        )
    if r.get("profile"):
        print("\nwhere a 1-page transfer's time goes (each part alone, median us):")
        for name, value in r["profile"].items():
            print(f"  {name}: {value:.1f}" if isinstance(value, float) else f"  {name}: {value}")
    if r.get("kernel_configs"):
        print(f"\ncopy kernel by config, {r['sizes'][-1]['size_bytes'] / 2**20:g} MiB (device us):")
        for name, us in r["kernel_configs"].items():
            print(f"  {name}: {us:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda_ipc")
    parser.add_argument("--sizes-mib", default="1,4,16,64,256")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="time the parts of a small transfer")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pdserve-kv-bench"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = LLAMA_1B if device == "cuda" else PageLayout(2, 4, 2, 8, torch.float32)
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    r = measure_kv_transfer(
        args.backend, device, layout, sizes, copy_bw=1.0, work_dir=args.work_dir,
        repeats=args.repeats, profile=args.profile,
    )  # fmt: skip
    print_report(r, layout)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
