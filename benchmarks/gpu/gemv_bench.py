"""Batch-1 linear layers: pdserve's fused Triton GEMVs against cuBLAS plus the separate elementwise
kernel they replace, at Llama-1B and Llama-8B shapes, inside CUDA graphs (as the decode step runs).

    python benchmarks/gpu/gemv_bench.py [--configs]

Each row cycles through enough copies of its weight (>= 256 MB) that nothing is served from L2,
as in a real step, which reads every layer's weights once. Every fused kernel is first checked
against the unfused path (max |fused - unfused| / max |unfused|). The copy rate is measured in the
same run; "of copy" is weight bytes per second over it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timer import copy_bandwidth  # noqa: E402

from pdserve.kernels import triton_activation, triton_norm  # noqa: E402
from pdserve.kernels.triton_gemv import (  # noqa: E402
    GemvConfig,
    add_norm_gemv,
    default_config,
    gemv,
    silu_mul_gemv,
)

SHAPES = [  # (name, K, N, prologue)
    ("1b qkv (norm)", 2048, 3072, "norm"),
    ("1b o_proj", 2048, 2048, "plain"),
    ("1b gate_up (norm)", 2048, 16384, "norm"),
    ("1b down (silu)", 8192, 2048, "silu"),
    ("8b qkv (norm)", 4096, 6144, "norm"),
    ("8b o_proj", 4096, 4096, "plain"),
    ("8b gate_up (norm)", 4096, 28672, "norm"),
    ("8b down (silu)", 14336, 4096, "silu"),
]
CONFIGS = [
    GemvConfig(bn, bk, w, s)
    for bn in (4, 8, 16, 32)
    for bk in (128, 256, 512)
    for w, s in ((4, 2), (4, 3), (4, 4), (8, 3))
    if bn * bk <= 8192
]


def graph_time_us(fn, calls: int, replays: int = 20) -> float:
    """Per-call time of fn(i) for i in range(calls), captured once in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm up: compile and allocate outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * calls))
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", action="store_true", help="also sweep the kernel configs")
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(dev, 1 << 30)
    print(f"copy rate {copy_bw / 1e9:,.0f} GB/s (read + write)")
    rows = []
    for name, k, n, prologue in SHAPES:
        wbytes = n * k * 2
        copies = max(4, -(-(256 << 20) // wbytes))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)]
        gamma = torch.rand(k, device=dev, dtype=dt) + 0.5
        x = torch.randn(1, 2 * k if prologue == "silu" else k, device=dev, dtype=dt)
        res = torch.randn(1, k, device=dev, dtype=dt)

        def unfused(i, x=x, res=res, gamma=gamma, ws=ws, prologue=prologue):
            if prologue == "norm":
                normed, _ = triton_norm.fused_add_rms_norm(x, res, gamma, 1e-5)
                return F.linear(normed, ws[i])
            if prologue == "silu":
                return F.linear(triton_activation.silu_and_mul(x), ws[i])
            return F.linear(x, ws[i])

        def fused(i, cfg=None, x=x, res=res, gamma=gamma, ws=ws, prologue=prologue):
            if prologue == "norm":
                return add_norm_gemv(x, res, gamma, 1e-5, ws[i], config=cfg)[0]
            if prologue == "silu":
                return silu_mul_gemv(x, ws[i], config=cfg)
            return gemv(x, ws[i], config=cfg)

        ref, got = unfused(0).float(), fused(0).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        t_ref = graph_time_us(unfused, copies)
        default = default_config(n, k, 1)
        t_def = graph_time_us(fused, copies)
        best = (t_def, default)
        if args.configs:
            for cfg in CONFIGS:
                try:
                    t = graph_time_us(lambda i, cfg=cfg: fused(i, cfg), copies)
                except Exception as e:  # a config the compiler refuses (registers, smem)
                    print(f"  {name} {cfg}: {type(e).__name__}")
                    continue
                best = min(best, (t, cfg))
        rows.append((name, wbytes, err, t_ref, t_def, default, *best))
        del ws
        torch.cuda.empty_cache()

    def pct(b, t):
        return f"{b / (t * 1e-6) / copy_bw:.0%}"

    print(
        "\n| layer | MB | err | cuBLAS + elementwise us (of copy) | fused default us (of copy) "
        "| best us (config) | default / cuBLAS speed |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, b, err, t_ref, t_def, _default, t_best, cfg in rows:
        print(
            f"| {name} | {b / 1e6:.1f} | {err:.1e} | {t_ref:.2f} ({pct(b, t_ref)}) | "
            f"{t_def:.2f} ({pct(b, t_def)}) | {t_best:.2f} {tuple(cfg)} | {t_ref / t_def:.2f}x |"
        )


if __name__ == "__main__":
    main()
