"""The prefill side of the KV transfer benchmark: `python kv_sender.py SPEC.json` (a child process:
CUDA IPC opens memory of another process only).

SPEC.json: backend, device, shape ([L, 2, num_pages, page_size, Hkv, D]), dtype, seed,
handshake_path (the receiver's handshake, msgpack), timeout_s; checks ([[rid, src_pages,
dst_pages], ...], sent first, one send each, into pages nothing else writes) and check_batch (the
same, sent with one send_many); transfers ([[rid, label, src_pages, dst_pages, is_timed], ...],
sent in order to decode 0); batches ([[label, [[rid, src_pages, dst_pages], ...], is_timed], ...]:
each timed both as one send_many and as one send per transfer); copy_sizes (bytes: a device copy
of each size is timed here, beside the transfers); profile (bool: time the parts of one small
transfer). The pool is filled by `fill_pool(seed, ...)`, which the receiver repeats to check the
bytes that landed. Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch


def fill_pool(pool: torch.Tensor, seed: int) -> torch.Tensor:
    """Random contents (never zeros), the same in every process for the same seed and device."""
    generator = torch.Generator(device=pool.device).manual_seed(seed)
    return pool.normal_(generator=generator)  # [L, 2, num_pages, page_size, Hkv, D]


def device_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int = 3) -> float:
    """Device time of one fn (which launches device work and does not wait for it): `repeats`
    calls queued behind a sleeping kernel, so they run back to back, timed by CUDA events and
    divided. The host's launch time stays out of it. On a CPU device: the median wall time."""
    for _ in range(warmup):
        fn()
    if not device.startswith("cuda"):
        return host_seconds(fn, repeats, warmup=0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(10_000_000)  # ~5 ms: every launch below is queued before the first runs
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def host_seconds(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    """Median wall time of fn (which must wait for its own device work, if it has to)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_seconds(num_bytes: int, device: str, repeats: int) -> float:
    """A plain device-to-device copy of num_bytes (torch `copy_`), the reference of each size."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    return device_seconds(lambda: dst.copy_(src), device, repeats)


def kernel_seconds(sender: Any, src_pages: list[int], dst_pages: list[int], repeats: int) -> float:
    """The copy kernel alone (cuda_ipc on one GPU): its device time for these pages."""
    copy = sender._copies[0]  # the benchmark looks inside: the kernel into decode 0's pool
    ids = torch.tensor(src_pages + dst_pages, dtype=torch.int32, device=sender.device)
    return device_seconds(lambda: copy(ids, 0, len(src_pages)), str(sender.device), repeats)


def run_batches(sender: Any, batches: list[list[Any]], timeout_s: float) -> dict[str, Any]:
    """Each batch's wall time as one send_many and as one send per transfer (medians)."""
    from pdserve.kv_transfer import Transfer

    out: dict[str, Any] = {}
    for label, items, is_timed in batches:
        transfers = [Transfer(rid, 0, src, dst) for rid, src, dst in items]

        def one_call(transfers: list[Transfer] = transfers) -> None:
            for outcome in sender.send_many(transfers, timeout_s):
                if isinstance(outcome, Exception):
                    raise outcome

        def one_each(transfers: list[Transfer] = transfers) -> None:
            for t in transfers:
                sender.send(t.rid, 0, t.src_pages, t.dst_pages, timeout_s)

        if is_timed:
            out[label] = {
                "send_many_s": host_seconds(one_call, 20, warmup=3),
                "send_each_s": host_seconds(one_each, 20, warmup=3),
                "num_transfers": len(transfers),
            }
    return out


def profile_parts(
    sender: Any, pool: torch.Tensor, src_page: int, dst_page: int, timeout_s: float
) -> dict[str, Any]:
    """Where a one-page cuda_ipc transfer's wall time goes: each part alone, median us. Writes
    only dst_page (a scratch page of decode 0's pool)."""
    from pdserve.kernels.triton_page_copy import PoolCopy, copy_pages
    from pdserve.kv_transfer.base import page_array, page_index

    copy, dst = sender._copies[0], sender._pools[0]
    usual = PoolCopy(pool, dst)
    usual.direct = False
    src_pages, dst_pages = [src_page], [dst_page]
    src_ids = page_array(src_pages, pool.shape[2], "src")
    dst_ids = page_array(dst_pages, dst.shape[2], "dst")
    ids = sender._ids.upload([src_ids, dst_ids])
    stream, event = torch.cuda.current_stream(), torch.cuda.Event()

    def wait() -> None:
        event.record(stream)
        event.synchronize()

    def send() -> None:
        sender.send("p", 0, src_pages, dst_pages, timeout_s)

    many = list(range(1, 513))
    parts = {
        "send(), 1 page": send,
        "page checks, 1 page (2 x page_array)": lambda: (
            page_array(src_pages, pool.shape[2], "s"),
            page_array(dst_pages, dst.shape[2], "d"),
        ),
        "page checks, 512 pages (2 x page_array)": lambda: (
            page_array(many, pool.shape[2], "s"),
            page_array(many, dst.shape[2], "d"),
        ),
        "page id upload (memmove + H2D enqueue)": lambda: sender._ids.upload([src_ids, dst_ids]),
        "copy kernel launch (direct, PoolCopy's default)": lambda: copy(ids, 0, 1),
        "copy kernel launch (Triton's usual dispatch)": lambda: usual(ids, 0, 1),
        "copy_few launch (ids as arguments, direct)": lambda: copy.copy_few(src_pages, dst_pages),
        "event record + wait, idle stream": wait,
        "upload + launch + wait": lambda: (
            sender._ids.upload([src_ids, dst_ids]),
            copy(ids, 0, 1),
            wait(),
        ),
        "before: 2 x torch.tensor(pages, device=cuda)": lambda: (
            page_index(src_pages, pool.device),
            page_index(dst_pages, pool.device),
        ),
        "copy_pages() one-shot (views, checks, cat, launch)": lambda: copy_pages(
            pool, ids[:1], dst, ids[1:2]
        ),
        "before: stream switch + wait_stream + synchronize": lambda: old_stream_sync(sender),
    }
    out: dict[str, Any] = {name: host_seconds(fn, 300) * 1e6 for name, fn in parts.items()}
    out.update(send_stages(sender, src_pages, dst_pages))
    torch.cuda.synchronize()
    import triton

    out["triton"] = triton.__version__
    return out


def send_stages(sender: Any, src_pages: list[int], dst_pages: list[int]) -> dict[str, float]:
    """send()'s cuda_ipc path for a one-page request, stage by stage (median us of each)."""
    from pdserve.kv_transfer import Transfer

    names = ["checks", "stream", "launch (copy_few)", "record", "wait"]
    samples: dict[str, list[float]] = {name: [] for name in names}
    copy = sender._copies[0]
    for i in range(320):
        t = [time.perf_counter()]
        push = sender._check(Transfer("p", 0, src_pages, dst_pages))
        t.append(time.perf_counter())
        stream = sender._current_stream()
        t.append(time.perf_counter())
        copy.copy_few(list(push.src_ids), list(push.dst_ids))
        t.append(time.perf_counter())
        sender._done.record(stream)
        t.append(time.perf_counter())
        sender._done.synchronize()
        t.append(time.perf_counter())
        if i >= 20:
            for name, a, b in zip(names, t, t[1:]):
                samples[name].append(b - a)
    return {f"stage {name}": statistics.median(v) * 1e6 for name, v in samples.items()}


def old_stream_sync(sender: Any) -> None:
    sender._stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(sender._stream):
        pass
    sender._stream.synchronize()


def kernel_configs(
    sender: Any, pool: torch.Tensor, src_pages: list[int], dst_pages: list[int]
) -> dict[str, float]:
    """Device time (us) of the copy kernel for these pages, by (block words, warps)."""
    from pdserve.kernels.triton_page_copy import PoolCopy

    ids = torch.tensor(src_pages + dst_pages, dtype=torch.int32, device=pool.device)
    out = {}
    for block, warps in [(4096, 4), (4096, 8), (2048, 4), (2048, 8), (1024, 4), (1024, 2)]:
        copy = PoolCopy(pool, sender._pools[0], block=block, num_warps=warps)
        seconds = device_seconds(lambda c=copy: c(ids, 0, len(src_pages)), "cuda", 20)
        out[f"block {block}, {warps} warps"] = seconds * 1e6
    return out


def main(spec_path: str) -> None:
    from pdserve.kv_transfer import Transfer, make_sender

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["handshake_path"], "rb") as f:
        handshake = msgpack.unpackb(f.read(), raw=False)
    device, timeout_s = spec["device"], spec["timeout_s"]
    pool = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    fill_pool(pool, spec["seed"])
    sender = make_sender(spec["backend"], pool, [handshake])
    for rid, src_pages, dst_pages in spec.get("checks", []):  # correctness first
        sender.send(rid, 0, src_pages, dst_pages, timeout_s=timeout_s)
    batch = [Transfer(rid, 0, src, dst) for rid, src, dst in spec.get("check_batch", [])]
    for outcome in sender.send_many(batch, timeout_s) if batch else []:
        if isinstance(outcome, Exception):
            raise outcome
    seconds: dict[str, list[float]] = {}
    num_bytes: dict[str, int] = {}
    pages_of: dict[str, tuple[list[int], list[int]]] = {}
    for rid, label, src_pages, dst_pages, is_timed in spec["transfers"]:
        result = sender.send(rid, 0, src_pages, dst_pages, timeout_s=timeout_s)
        if is_timed:
            seconds.setdefault(label, []).append(result.seconds)
            num_bytes[label] = result.num_bytes
            pages_of[label] = (src_pages, dst_pages)
    result: dict[str, Any] = {"seconds": seconds, "bytes": num_bytes}
    result["batches"] = run_batches(sender, spec.get("batches", []), timeout_s)
    result["copy_seconds"] = {
        str(size): copy_seconds(size, device, 20) for size in spec.get("copy_sizes", [])
    }
    if spec["backend"] == "cuda_ipc" and 0 in getattr(sender, "_copies", {}):
        result["kernel_seconds"] = {
            label: kernel_seconds(sender, *pages, repeats=20) for label, pages in pages_of.items()
        }
    if spec.get("profile") and "kernel_seconds" in result:
        src_page, dst_page = spec["scratch_pages"]
        result["profile"] = profile_parts(sender, pool, src_page, dst_page, timeout_s)
        big = max(pages_of, key=lambda label: num_bytes[label])
        result["kernel_configs"] = kernel_configs(sender, pool, *pages_of[big])
    sender.close()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
