"""Timing on the benchmark's device, and the two ceilings every other number is compared with:
device copy bandwidth (bytes read + written per second) and bf16 matmul rate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall(device: str) -> float:
    """time.perf_counter() after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int = 3) -> float:
    """Median time of `fn` over `repeats` runs: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: str, num_bytes: int, repeats: int = 20) -> float:
    """Bytes read + written per second by one large device-to-device `copy_`."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * num_bytes / seconds


def matmul_rate(device: str, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs) on random (never zero) operands."""
    a = torch.empty((n, n), dtype=dtype, device=device).normal_()
    b = torch.empty((n, n), dtype=dtype, device=device).normal_()
    out = torch.empty((n, n), dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * n**3 / seconds


def cuda_graph_seconds(fn: Callable[[], object], replays: int = 10, repeats: int = 5) -> float:
    """Median seconds of one call of `fn` captured in a CUDA graph: run once first on a side
    stream (lazy setup and kernel compiles happen outside the capture), then `repeats` rounds of
    `replays` back-to-back replays timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(samples)
