"""The paged decode attention kernel's launch configs at the decode rows' shapes (Llama-1B: 32 q /
8 KV heads, D 64, page size 16, scattered pages), timed in CUDA graphs over 16 layers' caches as a
step reads them; every config's output is checked against the default config's first.

    python benchmarks/gpu/decode_config_sweep.py [--shapes 64x1024,256x1024]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timer import copy_bandwidth, cuda_graph_seconds  # noqa: E402

from pdserve.kernels.triton_decode_attention import (  # noqa: E402
    DecodeConfig,
    choose_num_splits,
    decode_attention,
)

HQ, HKV, D, PAGE = 32, 8, 64, 16
LAYERS = 16


def graph_us(fn) -> float:
    """Microseconds a layer: `fn` runs all LAYERS layers' caches in one CUDA graph."""
    return cuda_graph_seconds(fn) * 1e6 / LAYERS


def sweep(shape: str, copy_bw: float) -> None:
    batch, ctx = map(int, shape.split("x"))
    pages = -(-ctx // PAGE)
    num_pages = batch * pages + 1
    caches = [
        (
            torch.randn(num_pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16),
            torch.randn(num_pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(LAYERS)
    ]
    table = (torch.randperm(num_pages - 1, device="cuda")[: batch * pages] + 1).view(batch, pages)
    table = table.to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty_like(q) for _ in range(LAYERS)]
    kv_bytes = 2 * batch * ctx * HKV * D * 2

    def run(cfg):
        def fn():
            for (k, v), o in zip(caches, outs, strict=True):
                decode_attention(q, k, v, table, lens, D**-0.5, out=o, max_seq_len=ctx, config=cfg)

        return fn

    ref = decode_attention(q, *caches[0], table, lens, D**-0.5, max_seq_len=ctx).float()
    default_splits = choose_num_splits(batch, HKV, q.device, ctx)
    t_default = graph_us(run(None))
    best = (t_default, DecodeConfig(num_splits=default_splits))
    splits_options = sorted({default_splits, 1, 2})
    for bn, w, s, sp in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits_options):
        cfg = DecodeConfig(block_n=bn, num_warps=w, num_stages=s, num_splits=sp)
        try:
            got = decode_attention(q, *caches[0], table, lens, D**-0.5, config=cfg).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                print(f"  {shape} {cfg}: error {err:.1e}")
                continue
            t = graph_us(run(cfg))
        except Exception as e:  # resources the compiler refuses
            print(f"  {shape} {cfg}: {type(e).__name__}")
            continue
        best = min(best, (t, cfg))

    def pct(t):
        return f"{kv_bytes / (t * 1e-6) / copy_bw:.0%}"

    t_best, cfg = best
    print(
        f"| {shape} | {kv_bytes / 1e6:.1f} | {t_default:.1f} ({default_splits}), {pct(t_default)} "
        f"| {t_best:.1f}, {pct(t_best)} | {tuple(cfg)} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="64x1024,256x1024")
    args = p.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth("cuda", 1 << 30)
    print(f"copy rate {copy_bw / 1e9:,.0f} GB/s")
    print(
        "| batch x ctx | KV MB a layer | default (splits) us, of copy | best us, of copy | best config |"
    )
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        sweep(shape, copy_bw)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
