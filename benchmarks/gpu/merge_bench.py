"""The paged decode kernel's split merge: a second launch (`_decode_merge_kernel`) against the last
split program merging in the same launch (`decode_attention(merge_in_last=True)`).

Llama-1B's heads (32 q / 8 KV, D 64) and Llama-8B's (D 128), bf16, page size 16, pages scattered,
16 layers' caches as a decode step reads them. The split count is chosen from `--max-seq-len`, the
bound a CUDA graph of the runner is captured with, so short contexts have empty splits as there.
For every shape: both paths against a float32 reference (and the fused new-token path merged in
the last program against its reference); then a stress check, STRESS_CALLS back-to-back merged
calls in one CUDA graph, each output against the two-launch path's (a mismatch there is a
memory-ordering bug); then both paths timed in CUDA graphs of 16 layer calls (median of replays).

    python benchmarks/gpu/merge_bench.py            # on a GPU, about a minute with compiles
    python benchmarks/gpu/merge_bench.py --smoke    # tiny shapes on the CPU, Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timer import cuda_graph_seconds, median_seconds  # noqa: E402

PAGE = 16


class Plan(NamedTuple):
    device: str
    dtype: torch.dtype
    num_q_heads: int
    num_kv_heads: int
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    head_dims: tuple[int, ...]
    num_layers: int
    max_seq_len: int  # picks the split count, as a captured graph's bound does
    stress_calls: int
    tolerance: float  # max |out - ref| / max |ref|


GPU_PLAN = Plan("cuda", torch.bfloat16, 32, 8, (1, 4, 16), (128, 1024), (64, 128), 16, 4096,
                2000, 2e-2)  # fmt: skip
# The interpreter's bf16 dot is wrong, so the smoke run is float32; 2 KV heads so the CPU's
# stand-in SM count (8) still splits.
SMOKE_PLAN = Plan("cpu", torch.float32, 8, 2, (1, 3), (40,), (64,), 2, 1024, 4, 1e-4)


class Layers(NamedTuple):
    q: torch.Tensor  # [B, Hq, D]
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer k, v: [num_pages, PAGE, Hkv, D]
    table: torch.Tensor  # [B, pages per seq] int32, scattered page ids (page 0 unused)
    seq_lens: torch.Tensor  # [B] int32, all ctx


def make_layers(batch: int, ctx: int, dim: int, plan: Plan) -> Layers:
    gen = torch.Generator(device=plan.device).manual_seed(batch * 1009 + ctx * 7 + dim)
    pages_per_seq = -(-ctx // PAGE)
    num_pages = batch * pages_per_seq + 1
    perm = torch.randperm(num_pages - 1, generator=gen, device=plan.device) + 1
    table = perm.view(batch, pages_per_seq).to(torch.int32)
    shape = (num_pages, PAGE, plan.num_kv_heads, dim)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=plan.device, dtype=plan.dtype)

    caches = [(randn(*shape), randn(*shape)) for _ in range(plan.num_layers)]
    q = randn(batch, plan.num_q_heads, dim)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=plan.device)
    return Layers(q, caches, table, seq_lens)


def decode(layers: Layers, layer: int, plan: Plan, merge: bool, **kw) -> torch.Tensor:
    from pdserve.kernels.triton_decode_attention import decode_attention

    k, v = layers.caches[layer]
    scale = layers.q.shape[-1] ** -0.5
    return decode_attention(
        layers.q, k, v, layers.table, layers.seq_lens, scale,
        max_seq_len=plan.max_seq_len, merge_in_last=merge, **kw,
    )  # fmt: skip


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def check_reference(layers: Layers, plan: Plan) -> list[str]:
    """Both paths against the float32 reference, and the fused new-token path merged in the last
    program against its reference; the problems found, as lines."""
    from pdserve.config.engine_config import RopeScaling
    from pdserve.kernels.attention_ref import (
        NewToken,
        decode_attention_ref,
        decode_with_new_token_ref,
    )
    from pdserve.kernels.rotary_ref import rope_cos_sin_cache

    q, (k, v), table, lens = layers.q, layers.caches[0], layers.table, layers.seq_lens
    scale = q.shape[-1] ** -0.5
    ref = decode_attention_ref(q.float(), k.float(), v.float(), table, lens, scale)
    problems = []
    for merge in (False, True):
        err = rel_err(decode(layers, 0, plan, merge), ref)
        if err > plan.tolerance:
            problems.append(f"merge_in_last={merge}: error {err:.1e} against the reference")

    batch, _, dim = q.shape
    last = lens.long() - 1  # the new token: its position, and its slot in its page
    slots = table.long()[torch.arange(batch, device=q.device), last // PAGE] * PAGE + last % PAGE
    gen = torch.Generator(device=q.device).manual_seed(1)
    kv_shape = (2, batch, k.shape[2], dim)
    k_new, v_new = torch.randn(kv_shape, generator=gen, device=q.device).to(q.dtype)
    cos_sin = rope_cos_sin_cache(dim, plan.max_seq_len, 500000.0, RopeScaling(), q.device)
    new = NewToken(k_new, v_new, last, slots, cos_sin)
    ref = decode_with_new_token_ref(q, k.clone(), v.clone(), table, lens, scale, new)
    fused = Layers(q, [(k.clone(), v.clone())], table, lens)
    err = rel_err(decode(fused, 0, plan, True, new_token=new), ref)
    if err > plan.tolerance:
        problems.append(f"fused new token, merge_in_last: error {err:.1e} against the reference")
    return problems


def stress(layers: Layers, plan: Plan) -> tuple[int, int, float]:
    """plan.stress_calls merged calls back to back (layer i % num_layers), in one CUDA graph on a
    GPU, each against the two-launch path's output: (mismatched calls, bit-equal calls, max |diff|).
    """
    expected = [decode(layers, i, plan, False) for i in range(plan.num_layers)]
    outs = torch.empty((plan.stress_calls, *layers.q.shape), dtype=plan.dtype, device=plan.device)

    def run() -> None:
        for i in range(plan.stress_calls):
            decode(layers, i % plan.num_layers, plan, True, out=outs[i])

    if plan.device == "cuda":
        decode(layers, 0, plan, True, out=outs[0])  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        outs.fill_(float("nan"))  # what the capture left must not pass for the replay's
        graph.replay()
        torch.cuda.synchronize()
    else:
        run()
    want = torch.stack([expected[i % plan.num_layers] for i in range(plan.stress_calls)])
    diff = (outs.float() - want.float()).abs().flatten(1).amax(1).nan_to_num(float("inf"))
    scale = want.float().abs().max().item()
    mismatched = int((diff > 1e-2 * scale).sum())
    return mismatched, int((diff == 0).sum()), diff.max().item()


def time_paths(layers: Layers, plan: Plan) -> tuple[float, float]:
    """Microseconds a layer call, two-launch and merged: every layer's call in one CUDA graph on
    a GPU (perf_counter on the CPU, the plumbing only)."""
    outs = [torch.empty_like(layers.q) for _ in range(plan.num_layers)]

    def step(merge: bool) -> None:
        for layer, out in enumerate(outs):
            decode(layers, layer, plan, merge, out=out)

    if plan.device == "cuda":
        seconds = [cuda_graph_seconds(lambda m=m: step(m), replays=20, repeats=7) for m in (0, 1)]
    else:
        seconds = [median_seconds(lambda m=m: step(m), "cpu", 2, warmup=1) for m in (0, 1)]
    return seconds[0] * 1e6 / plan.num_layers, seconds[1] * 1e6 / plan.num_layers


def run_shape(batch: int, ctx: int, dim: int, plan: Plan) -> tuple[str, list[str]]:
    """One table row, and the problems found (reference or stress)."""
    from pdserve.kernels.triton_decode_attention import choose_num_splits, default_config

    device = torch.device(plan.device)
    block_n = default_config(batch, plan.num_kv_heads, dim, device).block_n
    splits = choose_num_splits(batch, plan.num_kv_heads, device, plan.max_seq_len, block_n)
    layers = make_layers(batch, ctx, dim, plan)
    problems = [f"{batch}x{ctx} D{dim}: {p}" for p in check_reference(layers, plan)]
    if splits > 1:
        mismatched, equal, max_diff = stress(layers, plan)
        stress_text = f"{equal}/{plan.stress_calls} equal, max diff {max_diff:.1e}"
        if mismatched:
            problems.append(
                f"{batch}x{ctx} D{dim}: MEMORY-ORDERING BUG? {mismatched} of {plan.stress_calls} "
                f"merged calls differ from the two-launch output (max |diff| {max_diff:.2e})"
            )
    else:
        stress_text = "one split: no merge"
    two, merged = time_paths(layers, plan)
    row = (
        f"| {batch} x {ctx}, D {dim} | {splits} | {two:.2f} | {merged:.2f} | {merged / two:.3f} "
        f"| {stress_text} |"
    )
    return row, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
        plan = SMOKE_PLAN
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    else:
        plan = GPU_PLAN
    torch.manual_seed(0)
    print(f"{plan.num_q_heads} q / {plan.num_kv_heads} KV heads, {plan.dtype}, page {PAGE}, "
          f"{plan.num_layers} layers, splits from max_seq_len {plan.max_seq_len}")  # fmt: skip
    print("| batch x ctx | splits | two launches us/layer | merged us/layer | merged / two "
          f"| stress: {plan.stress_calls} merged calls vs two-launch |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    problems = []
    for dim in plan.head_dims:
        for ctx in plan.contexts:
            for batch in plan.batches:
                row, found = run_shape(batch, ctx, dim, plan)
                print(row, flush=True)
                problems += found
    for line in problems:
        print(f"!!! {line}", file=sys.stderr)
    print("all checks PASS" if not problems else f"{len(problems)} checks FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
