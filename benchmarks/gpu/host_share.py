"""The host's share of a decode step: pure greedy decode at batch B and context C (Llama-3.2-1B's
shape, random bf16 weights), stepped back to back as a server steps (the overlapped loop), once as
is and once with the model's forward pass replaced by a stub that hands back ready logits, so the
device does next to nothing and what is left is the host's own loop. When the stubbed step takes
about as long as the real one, the step is host-bound and the device waits.

    python benchmarks/gpu/host_share.py --batches 1,64,256 --context 1024
    python benchmarks/gpu/host_share.py --smoke        # tiny shapes on the CPU: the plumbing

Printed: a table (real ms/step, host-only ms/step, their ratio), then cProfile's top entries of
the host-only steps at the largest batch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402
from engine_bench import (  # noqa: E402
    finish_all,
    make_engine,
    new_request,
    random_prompts,
    step_until,
    time_steps,
)


def stub_forward(engine: Any, vocab: int, max_batch: int) -> Any:
    """Replace the forward pass (the CUDA graph's replay, or the eager model) by one that returns
    a slice of ready logits; returns a function that undoes it."""
    runner = engine.core.runner
    device = runner.device
    logits = torch.randn(max_batch, vocab, device=device, dtype=torch.float32)
    graphs = runner.graph_runner
    if graphs is not None:
        # A decode step replays through graph_feed's replay_loaded; replay only in older trees.
        real, real_loaded = graphs.replay, getattr(graphs, "replay_loaded", None)
        graphs.replay = lambda fb: logits[: fb.batch_size]
        if real_loaded is not None:
            graphs.replay_loaded = lambda bs, with_lora, bsz: logits[:bsz]

        def undo() -> None:
            graphs.replay = real
            if real_loaded is not None:
                graphs.replay_loaded = real_loaded

        return undo
    real_model = runner.model
    runner.model = lambda fb, pool, **_: logits[: fb.logit_idx.numel()]

    def undo_model() -> None:
        runner.model = real_model

    return undo_model


def measure(engine: Any, spec: rc.ModelSpec, batch: int, context: int, steps: int, device: str,
            profile: bool) -> dict[str, Any]:  # fmt: skip
    core = engine.core
    rng = np.random.default_rng(batch)
    max_new = batch * context // 256 + 4 * steps + 64
    reqs = [new_request(p, max_new) for p in random_prompts(rng, batch, context, spec.vocab_size)]
    for req in reqs:
        core.add(req)
    step_until(core, lambda: all(r.output_ids for r in reqs))
    for _ in range(5):
        core.step()
    real_s, sizes = time_steps(core, device, steps)
    undo = stub_forward(engine, spec.vocab_size, batch)
    try:
        for _ in range(5):
            core.step()
        host_s, host_sizes = time_steps(core, device, steps)
        stats = None
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            time_steps(core, device, steps)
            profiler.disable()
            stats = pstats.Stats(profiler)
    finally:
        undo()
    finish_all(core, reqs)
    pure = all(n == batch for n in sizes + host_sizes)
    return {"batch": batch, "real_ms": real_s * 1e3, "host_ms": host_s * 1e3, "pure": pure,
            "stats": stats}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    if args.smoke:
        spec, device, dtype, root = rc.SMOKE_1B, "cpu", "float32", "/tmp/pdserve-bench-smoke"
        batches, args.context, args.steps = [1, 4], 16, 5
    else:
        spec, device, dtype, root = rc.LLAMA_1B, "cuda", "bfloat16", "/dev/shm/pdserve-bench"
    model = rc.write_checkpoint(spec, Path(root) / spec.name, device)
    top = max(batches)
    pages = top * (args.context + top * args.context // 256 + 8 * args.steps + 200) // 16 + 64
    engine = make_engine(
        model, device, dtype, "auto", num_pages=min(pages, 60_000),
        max_running_requests=top, cuda_graph=device == "cuda", cuda_graph_max_batch=top,
    )  # fmt: skip
    rows = [
        measure(engine, spec, b, args.context, args.steps, device, profile=b == top)
        for b in batches
    ]
    engine.shutdown()
    print(f"| batch (context {args.context}) | real ms/step | host-only ms/step | host / real |")
    print("|---|---|---|---|")
    for r in rows:
        note = "" if r["pure"] else " (not pure decode)"
        print(f"| {r['batch']}{note} | {r['real_ms']:.3f} | {r['host_ms']:.3f} | "
              f"{r['host_ms'] / r['real_ms']:.0%} |")  # fmt: skip
    stats = rows[-1]["stats"]
    if stats is not None:
        print(f"cProfile of {args.steps} host-only steps at batch {rows[-1]['batch']}:")
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
