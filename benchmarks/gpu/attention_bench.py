"""pdserve's paged attention kernels (Triton decode and extend) beside FlashInfer's paged decode and
prefill wrappers, at the shared device README's shapes: one layer, 32 query / 8 KV heads, page size
16, pages scattered over the pool. Each kernel's output is first checked against a float32 torch
reference on dense copies of the same K/V, then timed (median of `triton.testing.do_bench`, L2
flushed between calls) and held to the copy rate (decode) or matmul rate (prefill) measured in the
same call.

On the CPU (`--smoke`) pdserve's torch references stand in for its Triton kernels, at tiny shapes.
FlashInfer is optional: without it the rows say "flashinfer not installed".

    python benchmarks/gpu/attention_bench.py --warm-flashinfer decode 64   # build one JIT module
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

NUM_Q_HEADS, NUM_KV_HEADS, PAGE_SIZE = 32, 8, 16
KINDS = ("decode", "prefill")
FI_NOT_INSTALLED = "flashinfer not installed"


@dataclass(frozen=True)
class KernelPlan:
    device: str
    dtype: torch.dtype
    shapes: tuple[tuple[int, int], ...]  # (batch, context)
    head_dims: tuple[int, ...]
    tolerance: float  # max |out - ref| / max |ref|
    max_checked_seqs: dict[str, int]  # per kind: sequences compared with the reference


class Paged(NamedTuple):
    k: torch.Tensor  # [num_pages, PAGE_SIZE, Hkv, D]
    v: torch.Tensor  # [num_pages, PAGE_SIZE, Hkv, D]
    table: torch.Tensor  # [B, pages per seq] int32, scattered page ids (page 0 unused)
    seq_lens: torch.Tensor  # [B] int32
    q: torch.Tensor  # decode: [B, Hq, D]; prefill: [B * ctx, Hq, D]


def make_inputs(kind: str, batch: int, ctx: int, dim: int, plan: KernelPlan) -> Paged:
    """Random (never zero) q, K and V; the same seed gives the same tensors."""
    gen = torch.Generator(device=plan.device).manual_seed(batch * 100_003 + ctx * 7 + dim)
    pages_per_seq = -(-ctx // PAGE_SIZE)
    num_pages = batch * pages_per_seq + 1
    perm = torch.randperm(num_pages - 1, generator=gen, device=plan.device) + 1
    table = perm.view(batch, pages_per_seq).to(torch.int32)
    shape = (num_pages, PAGE_SIZE, NUM_KV_HEADS, dim)
    k = torch.randn(shape, generator=gen, device=plan.device, dtype=plan.dtype)
    v = torch.randn(shape, generator=gen, device=plan.device, dtype=plan.dtype)
    rows = batch if kind == "decode" else batch * ctx
    q = torch.randn((rows, NUM_Q_HEADS, dim), generator=gen, device=plan.device, dtype=plan.dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=plan.device)
    return Paged(k, v, table, lens, q)


# ---------------------------------------------------------------------------- the reference


def dense_kv(cache: torch.Tensor, table_row: torch.Tensor, ctx: int) -> torch.Tensor:
    """One sequence's [ctx, Hkv, D] rows, gathered from its pages."""
    return cache[table_row.long()].reshape(-1, *cache.shape[2:])[:ctx]


def reference(kind: str, inputs: Paged, seq: int, ctx: int) -> torch.Tensor:
    """float32 attention of sequence `seq`: decode [Hq, D], prefill [ctx, Hq, D] (causal)."""
    k = dense_kv(inputs.k, inputs.table[seq], ctx).float().transpose(0, 1)  # [Hkv, ctx, D]
    v = dense_kv(inputs.v, inputs.table[seq], ctx).float().transpose(0, 1)
    group = NUM_Q_HEADS // NUM_KV_HEADS
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [Hq, ctx, D]
    q = inputs.q[seq : seq + 1] if kind == "decode" else inputs.q[seq * ctx : (seq + 1) * ctx]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k, v, is_causal=kind == "prefill"
    )  # [Hq, Lq, D]
    return out.transpose(0, 1).squeeze(0)


def max_rel_error(kind: str, out: torch.Tensor, inputs: Paged, ctx: int, num_seqs: int) -> float:
    """max |out - ref| / max |ref| over the first `num_seqs` sequences."""
    err = scale = 0.0
    for seq in range(num_seqs):
        ref = reference(kind, inputs, seq, ctx)
        got = out[seq] if kind == "decode" else out[seq * ctx : (seq + 1) * ctx]
        err = max(err, (got.float() - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return err / max(scale, 1e-9)


# ---------------------------------------------------------------------------- implementations


def pdserve_kernel(kind: str, inputs: Paged, ctx: int, device: str) -> Callable[[], Any]:
    """pdserve's Triton kernel on CUDA; its torch reference on the CPU."""
    scale = inputs.q.shape[-1] ** -0.5
    k, v, table, lens, q = inputs.k, inputs.v, inputs.table, inputs.seq_lens, inputs.q
    batch = table.shape[0]
    if device != "cuda":
        from pdserve.kernels.attention_ref import decode_attention_ref, extend_attention_ref

        if kind == "decode":
            return lambda: decode_attention_ref(q, k, v, table, lens, scale)
        return lambda: extend_attention_ref(q, k, v, table, [ctx] * batch, [ctx] * batch, scale)
    if kind == "decode":
        from pdserve.kernels.triton_decode_attention import decode_attention

        return lambda: decode_attention(q, k, v, table, lens, scale, max_seq_len=ctx)
    from pdserve.kernels.triton_extend_attention import extend_attention

    starts = torch.arange(batch, dtype=torch.int32, device=q.device) * ctx
    return lambda: extend_attention(q, k, v, table, lens, lens, starts, ctx, scale)


def flashinfer_kernel(
    kind: str, inputs: Paged, ctx: int, workspace: torch.Tensor
) -> Callable[[], Any]:
    """FlashInfer's wrapper for `kind`, planned for these pages (the plan is outside the timing)."""
    import flashinfer

    batch, pages = inputs.table.shape
    dev, dim, dtype = inputs.q.device, inputs.q.shape[-1], inputs.q.dtype
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev) * pages
    indices = inputs.table.reshape(-1)
    last = torch.full((batch,), ctx - (pages - 1) * PAGE_SIZE, dtype=torch.int32, device=dev)
    shape = (NUM_Q_HEADS, NUM_KV_HEADS, dim, PAGE_SIZE)
    if kind == "decode":
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(kv_indptr, indices, last, *shape, q_data_type=dtype, kv_data_type=dtype)
    else:
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev) * ctx
        wrapper.plan(
            qo_indptr, kv_indptr, indices, last, *shape,
            causal=True, q_data_type=dtype, kv_data_type=dtype,
        )  # fmt: skip
    q, kv = inputs.q, (inputs.k, inputs.v)
    return lambda: wrapper.run(q, kv)


def flashinfer_status() -> str | None:
    """None when flashinfer imports; else why not."""
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return FI_NOT_INSTALLED
    except Exception as e:  # installed but broken (a missing CUDA library, an ABI mismatch)
        return f"flashinfer import failed: {type(e).__name__}: {str(e)[:200]}"
    return None


def warm_flashinfer(kind: str, dim: int) -> None:
    """Build (JIT) and run FlashInfer's module for `kind` at head dim `dim` on a tiny problem."""
    plan = KernelPlan("cuda", torch.bfloat16, ((1, 32),), (dim,), 1.0, {})
    inputs = make_inputs(kind, 1, 32, dim, plan)
    workspace = torch.zeros(16 << 20, dtype=torch.uint8, device="cuda")
    flashinfer_kernel(kind, inputs, 32, workspace)()
    torch.cuda.synchronize()


def start_flashinfer_warmers(head_dims: tuple[int, ...], log_dir: Path) -> list[Any]:
    """One child process per (kind, head dim): FlashInfer's JIT builds run side by side."""
    procs = []
    for kind in KINDS:
        for dim in head_dims:
            log = open(log_dir / f"flashinfer-warm-{kind}-{dim}.log", "w")  # noqa: SIM115
            argv = [sys.executable, __file__, "--warm-flashinfer", kind, str(dim)]
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            procs.append((kind, dim, proc, log))
    return procs


def wait_for_warmers(procs: list[Any], deadline: float) -> dict[str, str]:
    """Per module: "ok", "failed (rc N)" or "timed out" (then the child is ended)."""
    status = {}
    for kind, dim, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(deadline - time.perf_counter(), 0.1))
            status[f"{kind}-{dim}"] = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status[f"{kind}-{dim}"] = "timed out"
        log.close()
    return status


# ---------------------------------------------------------------------------- measuring


def time_us(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    from device_timer import median_seconds

    return median_seconds(fn, device, repeats=5, warmup=1) * 1e6


def work_of(kind: str, batch: int, ctx: int, dim: int, elem: int) -> tuple[int, float]:
    """(KV bytes read, FLOPs) of one call."""
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * dim * elem
    pairs = ctx if kind == "decode" else ctx * (ctx + 1) / 2  # (query, key) pairs per sequence
    return kv_bytes, 4 * batch * NUM_Q_HEADS * dim * pairs


def measure(
    kind: str, impl: str, fn: Callable[[], Any], inputs: Paged, shape: tuple[int, int, int],
    plan: KernelPlan, ceilings: tuple[float, float],
) -> dict[str, Any]:  # fmt: skip
    """Check one implementation against the reference, then time it."""
    batch, ctx, dim = shape
    checked = min(batch, plan.max_checked_seqs[kind])
    err = max_rel_error(kind, fn(), inputs, ctx, checked)
    us = time_us(fn, plan.device)
    kv_bytes, flops = work_of(kind, batch, ctx, dim, inputs.k.element_size())
    copy_bw, matmul_flops = ceilings
    return {
        "kind": kind, "impl": impl, "batch": batch, "context": ctx, "head_dim": dim,
        "max_rel_err": err, "checked_seqs": checked, "ok": err <= plan.tolerance, "us": us,
        "kv_gb_s": kv_bytes / us / 1e3, "tflops": flops / us / 1e6,
        "of_copy": kv_bytes / (us * 1e-6) / copy_bw,
        "of_matmul": flops / (us * 1e-6) / matmul_flops,
    }  # fmt: skip


def run_kernels(
    plan: KernelPlan, copy_gb_s: float, matmul_tflops: float, say: Callable[[str], None],
    log_dir: Path, warm_deadline_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Every (kind, head dim, shape): pdserve's kernel and FlashInfer's, checked and timed."""
    fi = flashinfer_status() if plan.device == "cuda" else FI_NOT_INSTALLED
    say(f"kernels: {fi or 'flashinfer available'}")
    cases = [(k, b, c, d) for k in KINDS for d in plan.head_dims for b, c in plan.shapes]
    warm: dict[str, str] = {}
    if fi is None:
        t0 = time.perf_counter()
        procs = start_flashinfer_warmers(plan.head_dims, log_dir)
        for kind, batch, ctx, dim in cases:  # pdserve's kernels compile while FlashInfer's build
            inputs = make_inputs(kind, batch, ctx, dim, plan)
            pdserve_kernel(kind, inputs, ctx, plan.device)()
            del inputs
        warm = wait_for_warmers(procs, t0 + warm_deadline_s)
        say(f"kernels: flashinfer JIT warm-up {time.perf_counter() - t0:.0f} s: {warm}")
    ceilings = (copy_gb_s * 1e9, matmul_tflops * 1e12)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=plan.device) if not fi else None
    rows = []
    for kind, batch, ctx, dim in cases:
        inputs = make_inputs(kind, batch, ctx, dim, plan)
        shape = (batch, ctx, dim)
        impls = [("pdserve", pdserve_kernel(kind, inputs, ctx, plan.device))]
        if workspace is not None and warm.get(f"{kind}-{dim}") == "ok":
            impls.append(("flashinfer", flashinfer_kernel(kind, inputs, ctx, workspace)))
        for impl, fn in impls:
            try:
                row = measure(kind, impl, fn, inputs, shape, plan, ceilings)
            except Exception as e:  # one implementation failing leaves the others' numbers
                row = {"kind": kind, "impl": impl, "batch": batch, "context": ctx,
                       "head_dim": dim, "error": f"{type(e).__name__}: {str(e)[:200]}"}  # fmt: skip
            rows.append(row)
            say(f"kernels: {_row_text(row)}")
        del inputs, impls
    return {
        "flashinfer": fi or "available",
        "flashinfer_warmup": warm,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "page_size": PAGE_SIZE,
        "heads": [NUM_Q_HEADS, NUM_KV_HEADS],
        "copy_gb_s": copy_gb_s,
        "matmul_tflops": matmul_tflops,
        "rows": rows,
    }


def _row_text(r: dict[str, Any]) -> str:
    what = f"{r['kind']} {r['impl']} {r['batch']}x{r['context']} D{r['head_dim']}"
    if "error" in r:
        return f"{what}: error {r['error']}"
    check = "PASS" if r["ok"] else "FAIL"
    rate = (
        f"{r['of_copy']:.0%} of copy"
        if r["kind"] == "decode"
        else f"{r['tflops']:.0f} TFLOP/s, {r['of_matmul']:.0%} of matmul"
    )
    return f"{what}: {r['us']:.1f} us, {rate}; check {check} (max rel err {r['max_rel_err']:.1e})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm-flashinfer", nargs=2, metavar=("KIND", "HEAD_DIM"), required=True)
    args = p.parse_args(argv)
    kind, dim = args.warm_flashinfer
    t0 = time.perf_counter()
    warm_flashinfer(kind, int(dim))
    print(f"flashinfer {kind} D{dim} built and ran in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
