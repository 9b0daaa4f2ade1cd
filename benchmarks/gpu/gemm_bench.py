"""The decode step's linears (y = x W^T, bf16) at small batches, as a step runs them: 16 layers'
distinct weights in one CUDA graph (no weight stays in L2), through cuBLAS as pdserve calls it
(F.linear), through cuBLASLt's heuristics (`preferred_blas_library("cublaslt")`), as a split-K
batched GEMM over strided views of the same weight plus a sum, and (--autotune) through inductor's
max-autotune (its Triton templates against cuBLAS). Each variant is checked against a float64
reference first; times are per layer, with the weight's bytes over the time as a share of the copy
rate measured in the same call.

    python benchmarks/gpu/gemm_bench.py [--models 1b,8b] [--rows 1,64,256] [--autotune]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timer import copy_bandwidth, cuda_graph_seconds  # noqa: E402

LAYERS = 16
# (name, out features N, in features K) of a layer's projections
SHAPES = {
    "1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)],
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
}


def split_k(splits: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """x [M, K] @ w [N, K]^T as `splits` GEMMs over K-slices of w's rows (strided views, no copy)
    in one batched call, then the partial sums added."""

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        part = k // splits
        xs = x.view(m, splits, part).transpose(0, 1)  # [S, M, K/S]
        ws = w.as_strided((splits, part, n), (part, 1, k))  # [S, K/S, N]: w[:, s-th slice]^T
        return torch.bmm(xs, ws).sum(0)

    return linear


def variants(autotune: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    # The same call twice: run_shape switches torch's BLAS preference for the "cuBLASLt" one.
    out: dict[str, Callable] = {"cuBLAS (F.linear)": F.linear, "cuBLASLt": F.linear}
    out.update({f"split-K {s}": split_k(s) for s in (2, 4, 8)})
    if autotune:
        out["inductor max-autotune"] = torch.compile(
            F.linear, mode="max-autotune-no-cudagraphs", dynamic=False
        )
    return out


def run_shape(rows: int, n: int, k: int, fns: dict) -> dict[str, float]:
    dt = torch.bfloat16
    ws = [torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5 for _ in range(LAYERS)]
    x = torch.randn(rows, k, device="cuda", dtype=dt)
    ref = (x.double() @ ws[0].double().t()).float()
    times = {}
    for name, fn in fns.items():
        backend = torch.backends.cuda.preferred_blas_library()
        if name == "cuBLASLt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            got = fn(x, ws[0]).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                print(f"  {rows}x{n}x{k} {name}: error {err:.1e}, skipped")
                continue

            def step(fn=fn) -> None:
                for w in ws:
                    fn(x, w)

            times[name] = cuda_graph_seconds(step) / LAYERS
        except Exception as e:  # a variant the library refuses at this shape
            print(f"  {rows}x{n}x{k} {name}: {type(e).__name__}: {str(e)[:120]}")
        finally:
            torch.backends.cuda.preferred_blas_library(backend)
    ws.clear()
    torch.cuda.empty_cache()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="1b,8b")
    p.add_argument("--rows", default="1,64,256")
    p.add_argument("--autotune", action="store_true", help="also inductor's max-autotune")
    args = p.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth("cuda", 1 << 30)
    print(f"copy rate {copy_bw / 1e9:,.0f} GB/s (read + write)")
    fns = variants(args.autotune)
    names = list(fns)
    print("| model, linear, rows | weight MB | " + " | ".join(names) + " | best vs cuBLAS |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for model in args.models.split(","):
        for proj, n, k in SHAPES[model]:
            for rows in (int(r) for r in args.rows.split(",")):
                times = run_shape(rows, n, k, fns)
                num_bytes = n * k * 2
                cells = [
                    f"{times[v] * 1e6:.1f} ({num_bytes / times[v] / copy_bw:.0%})"
                    if v in times
                    else "-"
                    for v in names
                ]
                base = times.get(names[0])
                best = min(times.values()) if times else None
                gain = f"{base / best:.2f}x" if base and best else "-"
                print(f"| {model} {proj}, {rows} | {num_bytes / 1e6:.1f} | " + " | ".join(cells)
                      + f" | {gain} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
