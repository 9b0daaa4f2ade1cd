"""Triton kernels on the GPU: correctness against the torch references, then timings, then a table.

    PYTHONPATH=$PWD python3 benchmarks/kernels/bench_kernels.py [--sweep]

Timings are medians of `triton.testing.do_bench` (L2 flushed between calls), compared with the
H100's measured rooflines: 3.0 TB/s for a device copy (bytes read + written), 800 TFLOP/s bf16.
`--sweep` also times the attention kernels over grids of launch configs, printing the best.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench, do_bench_cudagraph

from pdserve.config.engine_config import RopeScaling
from pdserve.kernels import triton_activation as act
from pdserve.kernels import triton_decode_attention as dec
from pdserve.kernels import triton_extend_attention as ext
from pdserve.kernels import triton_norm as norm
from pdserve.kernels import triton_page_copy as pc
from pdserve.kernels import triton_rotary as rot
from pdserve.kernels.activation_ref import silu_and_mul_ref
from pdserve.kernels.attention_ref import decode_attention_ref, extend_attention_ref
from pdserve.kernels.norm_ref import fused_add_rms_norm_ref, rms_norm_ref
from pdserve.kernels.page_copy_ref import gather_pages_ref
from pdserve.kernels.rotary_ref import apply_rotary_ref, rope_cos_sin_cache

COPY_BW = 3.0e12  # bytes read + written per second
PEAK_FLOPS = 800e12
DEV = "cuda"
BF16 = torch.bfloat16
HQ, HKV, PAGE = 32, 8, 16


class Row(NamedTuple):
    kernel: str
    shape: str
    us: float
    rate: str  # achieved TB/s or TFLOP/s
    roof: str  # percent of the roofline
    baseline: str  # a torch/SDPA/FlashInfer time for the same work, or "-"


def bench_us(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


# ---- inputs ----------------------------------------------------------------------------------


def paged_kv(
    seq_lens: list[int],
    dim: int,
    dtype: torch.dtype,
    page_size: int = PAGE,
    num_kv_heads: int = HKV,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches [P, page, Hkv, D] and a page table whose pages are scattered over the pool."""
    per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(per_seq) + 1
    perm = torch.randperm(num_pages - 1) + 1  # page 0 stays unused, like the pool's
    table = torch.zeros((len(seq_lens), max(per_seq)), dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = perm[used : used + n]
        used += n
    shape = (num_pages, page_size, num_kv_heads, dim)
    k = torch.randn(shape, dtype=dtype, device=DEV)
    v = torch.randn(shape, dtype=dtype, device=DEV)
    return k, v, table.to(DEV)


def i32(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=DEV)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (out.float() - ref.float()).abs().max().item()
    return err, err / max(ref.float().abs().max().item(), 1e-6)


# ---- 1. correctness --------------------------------------------------------------------------


def check_decode(dtype: torch.dtype, num_splits: int | None) -> tuple[float, float]:
    lens = torch.randint(1, 2000, (37,)).tolist()
    k, v, table = paged_kv(lens, 128, dtype)
    q = torch.randn((37, HQ, 128), dtype=dtype, device=DEV)
    cfg = dec.DecodeConfig(num_splits=num_splits)
    out = dec.decode_attention(q, k, v, table, i32(lens), 128**-0.5, config=cfg)
    return errors(out, decode_attention_ref(q, k, v, table, i32(lens), 128**-0.5))


def check_extend(dtype: torch.dtype) -> tuple[float, float]:
    ext_lens = torch.randint(1, 300, (37,)).tolist()
    seq_lens = [e + p for e, p in zip(ext_lens, torch.randint(0, 500, (37,)).tolist())]
    k, v, table = paged_kv(seq_lens, 64, dtype)
    q = torch.randn((sum(ext_lens), HQ, 64), dtype=dtype, device=DEV)
    starts = [0] + torch.tensor(ext_lens).cumsum(0).tolist()[:-1]
    out = ext.extend_attention(
        q, k, v, table, i32(seq_lens), i32(ext_lens), i32(starts), max(ext_lens), 0.125
    )
    return errors(out, extend_attention_ref(q, k, v, table, seq_lens, ext_lens, 0.125))


def check_norms() -> list[tuple[str, float, float]]:
    x = torch.randn((37, 4096), dtype=BF16, device=DEV)
    res = torch.randn_like(x)
    w = torch.rand(4096, dtype=BF16, device=DEV) + 0.5
    normed, summed = norm.fused_add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, res, w, 1e-6)
    return [
        ("rms_norm bf16", *errors(norm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))),
        ("fused_add_rms_norm bf16 (norm)", *errors(normed, ref_normed)),
        ("fused_add_rms_norm bf16 (sum)", *errors(summed, ref_summed)),
    ]


def check_small_kernels() -> list[tuple[str, float, float]]:
    cache = rope_cos_sin_cache(128, 8192, 500000.0, RopeScaling(), DEV)
    pos = torch.randint(0, 8192, (37,), device=DEV)
    q = torch.randn((37, HQ, 128), dtype=BF16, device=DEV)
    k = torch.randn((37, HKV, 128), dtype=BF16, device=DEV)
    ref_q, ref_k = apply_rotary_ref(q, k, pos, cache)
    rot.apply_rotary_(q, k, pos, cache)
    x = torch.randn((37, 2 * 14336), dtype=BF16, device=DEV)
    pool = torch.randn((4, 2, 33, PAGE, HKV, 128), dtype=BF16, device=DEV)
    ids = torch.randperm(33, device=DEV)[:17]
    return [
        ("rotary bf16 (q)", *errors(q, ref_q)),
        ("rotary bf16 (k)", *errors(k, ref_k)),
        ("silu_and_mul bf16", *errors(act.silu_and_mul(x), silu_and_mul_ref(x))),
        ("gather_pages bf16", *errors(pc.gather_pages(pool, ids), gather_pages_ref(pool, ids))),
    ]


def run_checks() -> bool:
    torch.backends.cuda.matmul.allow_tf32 = False
    results: list[tuple[str, float, float, float]] = []  # name, max abs, max rel, tolerance
    for dtype, tol in ((BF16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-4)):
        for splits in (None, 1, 5):
            results.append((f"decode {dtype} splits={splits}", *check_decode(dtype, splits), tol))
        results.append((f"extend {dtype}", *check_extend(dtype), tol))
    results += [(*r, 1e-2) for r in check_norms()]
    results += [(*r, 1e-2) for r in check_small_kernels()]
    all_ok = True
    for name, err, rel, tol in results:
        ok = rel <= tol
        all_ok &= ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:42s} max_abs={err:.2e} max_rel={rel:.2e}")
    return all_ok


# ---- 2. timings ------------------------------------------------------------------------------

DECODE_SHAPES = [(1, 1024, 64), (64, 1024, 64), (256, 1024, 64), (64, 4096, 128), (256, 2048, 128)]


def decode_inputs(batch: int, ctx: int, dim: int) -> tuple[torch.Tensor, ...]:
    k, v, table = paged_kv([ctx] * batch, dim, BF16)
    q = torch.randn((batch, HQ, dim), dtype=BF16, device=DEV)
    return q, k, v, table, i32([ctx] * batch)


def sdpa_us(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> str:
    """q: [B, Hq, Lq, D], k/v: [B, Hkv, Lk, D] unpaged; SDPA picks its fastest kernel."""
    try:
        fn = partial(F.scaled_dot_product_attention, q, k, v, is_causal=is_causal, enable_gqa=True)
        return f"{bench_us(fn):.1f}"
    except RuntimeError as e:
        return f"failed ({str(e).splitlines()[0][:40]})"


def flashinfer_decode_us(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, ctx: int
) -> float | None:
    try:
        import flashinfer
    except ImportError:
        return None
    batch, pages = table.shape
    try:
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(128 << 20, dtype=torch.uint8, device=DEV), "NHD"
        )
        indptr = torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * pages
        last = torch.full((batch,), ctx - (pages - 1) * PAGE, dtype=torch.int32, device=DEV)
        wrapper.plan(indptr, table.reshape(-1), last, HQ, HKV, q.shape[-1], PAGE, data_type=BF16)
        return bench_us(lambda: wrapper.run(q, (k, v)))
    except Exception as e:  # optional comparison: report and go on
        print(f"flashinfer decode failed: {e!r}")
        return None


def graph_us(fn: Callable[[], object]) -> str:
    """Time inside a CUDA graph: the kernels alone, without Python launch overhead."""
    try:
        return f"{do_bench_cudagraph(fn, rep=50, return_mode='median') * 1e3:.1f} us"
    except RuntimeError as e:
        return f"failed: {str(e).splitlines()[0][:40]}"


def decode_row(batch: int, ctx: int, dim: int) -> Row:
    q, k, v, table, lens = decode_inputs(batch, ctx, dim)
    kv_bytes = 2 * batch * ctx * HKV * dim * 2
    fn = partial(dec.decode_attention, q, k, v, table, lens, dim**-0.5, max_seq_len=ctx)
    us = bench_us(fn)
    k_flat = torch.randn((batch, HKV, ctx, dim), dtype=BF16, device=DEV)
    base = f"SDPA unpaged {sdpa_us(q[:, :, None], k_flat, torch.randn_like(k_flat), False)}"
    fi = flashinfer_decode_us(q, k, v, table, ctx)
    if fi is not None:
        base += f"; FlashInfer {fi:.1f}"
    splits = dec.choose_num_splits(batch, HKV, q.device, ctx)
    tbps = kv_bytes / us / 1e6
    return Row(
        "decode",
        f"{batch}x{ctx} D{dim} s{splits} (graph {graph_us(fn)})",
        us,
        f"{tbps:.2f} TB/s",
        f"{100 * tbps / 3.0:.0f}%",
        base,
    )


def sweep_decode_shape(batch: int, ctx: int, dim: int) -> None:
    q, k, v, table, lens = decode_inputs(batch, ctx, dim)
    kv_bytes = 2 * batch * ctx * HKV * dim * 2
    found = []
    for block_n, warps, stages in SWEEP:
        for splits in (1, 2, 4, 8, 16):
            cfg = dec.DecodeConfig(block_n, warps, stages, splits)
            fn = partial(dec.decode_attention, q, k, v, table, lens, 0.1, config=cfg)
            try:
                found.append((bench_us(fn, warmup=5, rep=20), cfg))
            except OutOfResources:
                print(f"  {cfg}: out of resources")
    found.sort(key=lambda t: t[0])
    best_per_split = {cfg.num_splits: (us, cfg) for us, cfg in reversed(found)}
    for us, cfg in found[:2] + sorted(best_per_split.values(), key=lambda t: t[1].num_splits):
        pct = 100 * kv_bytes / us / 1e6 / 3.0
        print(f"sweep decode {batch}x{ctx} D{dim}: {us:7.1f} us {pct:4.0f}%  {cfg}")
    print(f"  (auto num_splits={dec.choose_num_splits(batch, HKV, q.device, ctx)})")


def sweep_extend_shape(batch: int, prefix: int, new: int, dim: int) -> None:
    seq = prefix + new
    k, v, table = paged_kv([seq] * batch, dim, BF16)
    q = torch.randn((batch * new, HQ, dim), dtype=BF16, device=DEV)
    lens, ext_lens = i32([seq] * batch), i32([new] * batch)
    starts = i32([b * new for b in range(batch)])
    flops = 4 * batch * HQ * dim * (new * prefix + new * (new + 1) / 2)
    found = []
    for cfg in EXTEND_SWEEP:
        config = ext.ExtendConfig(*cfg)
        fn = partial(ext.extend_attention, q, k, v, table, lens, ext_lens, starts, new, 0.1,
                     config=config)  # fmt: skip
        try:
            found.append((bench_us(fn, warmup=5, rep=30), cfg))
        except OutOfResources:
            print(f"  {cfg}: out of resources")
    found.sort(key=lambda t: t[0])
    for us, cfg in found[:4]:
        tflops = flops / us / 1e6
        print(f"sweep extend {batch}x({prefix}+{new}) D{dim}: {us:7.1f} us {tflops:4.0f} TFLOP/s "
              f"(block_m, block_n, warps, stages)={cfg}")  # fmt: skip
    print(f"  (default {ext.default_extend_config(dim, BF16)})")


SWEEP = [
    (32, 2, 2),
    (32, 4, 3),
    (64, 4, 2),
    (64, 4, 3),
    (64, 8, 3),
    (128, 4, 2),
    (128, 8, 2),
    (128, 8, 3),
]
EXTEND_SWEEP = [
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 4),
]
EXTEND_SHAPES = [(1, 0, 4096, 128), (8, 0, 1024, 128), (8, 3072, 1024, 128), (4, 0, 2048, 64)]
PAGE_COPY_POOL_PAGES, PAGE_COPY_MB = 512, (4, 64, 256)  # pool of 2 MB pages (32 layers)
ELEMENTWISE_TOKENS = 4096


def extend_row(batch: int, prefix: int, new: int, dim: int) -> Row:
    seq = prefix + new
    k, v, table = paged_kv([seq] * batch, dim, BF16)
    q = torch.randn((batch * new, HQ, dim), dtype=BF16, device=DEV)
    lens, ext_lens = i32([seq] * batch), i32([new] * batch)
    starts = i32([b * new for b in range(batch)])
    fn = partial(ext.extend_attention, q, k, v, table, lens, ext_lens, starts, new, dim**-0.5)
    us = bench_us(fn)
    flops = 4 * batch * HQ * dim * (new * prefix + new * (new + 1) / 2)
    base = "-"
    if prefix == 0:
        qs = q.view(batch, new, HQ, dim).transpose(1, 2)
        ks = torch.randn((batch, HKV, new, dim), dtype=BF16, device=DEV)
        base = f"SDPA causal {sdpa_us(qs, ks, torch.randn_like(ks), True)}"
    tflops = flops / us / 1e6
    return Row(
        "extend",
        f"{batch}x(prefix {prefix} + {new}) D{dim}",
        us,
        f"{tflops:.0f} TFLOP/s",
        f"{100 * tflops / 800:.0f}%",
        base,
    )


def page_copy_rows(pool: torch.Tensor, megabytes: int) -> list[Row]:
    page_bytes = pool[:, :, 0].numel() * pool.element_size()
    ids = torch.randperm(pool.shape[2] - 1, device=DEV)[: megabytes * 2**20 // page_bytes] + 1
    staging = pc.gather_pages(pool, ids)
    nbytes = staging.numel() * staging.element_size()
    cases = [
        (
            "gather_pages",
            partial(pc.gather_pages, pool, ids, out=staging),
            partial(torch.index_select, pool, 2, ids, out=staging),
        ),
        (
            "scatter_pages",
            partial(pc.scatter_pages, pool, ids, staging),
            partial(pool.index_copy_, 2, ids, staging),
        ),
    ]
    rows = []
    for name, fn, torch_fn in cases:
        us, base = bench_us(fn), bench_us(torch_fn)
        rows.append(
            Row(
                name,
                f"{megabytes} MB ({len(ids)} pages x {pool.shape[0]} layers)",
                us,
                f"{nbytes / us / 1e3:.0f} GB/s",
                f"{100 * 2 * nbytes / us / 3e6:.0f}%",
                f"torch index {base:.1f} ({nbytes / base / 1e3:.0f} GB/s)",
            )
        )
    return rows


def time_page_copy() -> list[Row]:
    pool = torch.randn((32, 2, PAGE_COPY_POOL_PAGES, PAGE, HKV, 128), dtype=BF16, device=DEV)
    return [row for mb in PAGE_COPY_MB for row in page_copy_rows(pool, mb)]


def time_elementwise() -> list[Row]:
    tokens, hidden, inter = ELEMENTWISE_TOKENS, 4096, 14336
    x = torch.randn((tokens, hidden), dtype=BF16, device=DEV)
    res, w = torch.randn_like(x), torch.rand(hidden, dtype=BF16, device=DEV)
    gate_up = torch.randn((tokens, 2 * inter), dtype=BF16, device=DEV)
    q = torch.randn((tokens, HQ, 128), dtype=BF16, device=DEV)
    k = torch.randn((tokens, HKV, 128), dtype=BF16, device=DEV)
    cache = rope_cos_sin_cache(128, 8192, 500000.0, RopeScaling(), DEV)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)
    cases = [
        (
            "rms_norm",
            f"{tokens}x{hidden}",
            2 * x.nbytes,
            lambda: norm.rms_norm(x, w, 1e-6),
            lambda: rms_norm_ref(x, w, 1e-6),
        ),
        (
            "fused_add_rms_norm",
            f"{tokens}x{hidden}",
            4 * x.nbytes,
            lambda: norm.fused_add_rms_norm(x, res, w, 1e-6),
            lambda: fused_add_rms_norm_ref(x, res, w, 1e-6),
        ),
        (
            "silu_and_mul",
            f"{tokens}x{inter}",
            gate_up.nbytes * 3 // 2,
            lambda: act.silu_and_mul(gate_up),
            lambda: silu_and_mul_ref(gate_up),
        ),
        (
            "rotary (in place)",
            f"{tokens}x({HQ}+{HKV})x128",
            2 * (q.nbytes + k.nbytes),
            lambda: rot.apply_rotary_(q, k, pos, cache),
            lambda: apply_rotary_ref(q, k, pos, cache),
        ),
    ]
    rows = []
    for name, shape, nbytes, fn, ref_fn in cases:
        us, base = bench_us(fn), bench_us(ref_fn)
        rows.append(
            Row(
                name,
                shape,
                us,
                f"{nbytes / us / 1e6:.2f} TB/s",
                f"{100 * nbytes / us / 1e6 / 3.0:.0f}%",
                f"torch {base:.1f}",
            )
        )
    return rows


# ---- 3. report -------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    print("\n| kernel | shape | µs | achieved | of roofline | baseline (µs) |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.kernel} | {r.shape} | {r.us:.1f} | {r.rate} | {r.roof} | {r.baseline} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep attention launch configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    all_ok = run_checks()
    if args.sweep:
        for shape in DECODE_SHAPES:
            sweep_decode_shape(*shape)
        for shape in (EXTEND_SHAPES[0], EXTEND_SHAPES[2], EXTEND_SHAPES[3]):
            sweep_extend_shape(*shape)
    rows = [decode_row(*shape) for shape in DECODE_SHAPES]
    rows += [extend_row(*shape) for shape in EXTEND_SHAPES]
    rows += time_page_copy() + time_elementwise()
    print(f"\ncorrectness: {'all PASS' if all_ok else 'FAILURES above'}")
    print_table(rows)


if __name__ == "__main__":
    main()
