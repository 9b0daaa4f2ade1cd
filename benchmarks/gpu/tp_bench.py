"""Tensor parallelism on several GPUs (issue 15): decode step time at tp 1, 2, 4, ... on one model
shape, greedy outputs checked against tp 1 first. Written for a multi-GPU machine (none has been
lent yet); `--smoke` runs it on the CPU with gloo on the tiny model.

    python benchmarks/gpu/tp_bench.py                       # Llama-8B shape, tp 1 and every
                                                            # power of two up to the GPU count
    python benchmarks/gpu/tp_bench.py --shape 1b --batches 1,64
    python benchmarks/gpu/tp_bench.py --smoke               # CPU, gloo, tiny model, tp 1 and 2

Each engine is in-process (`Engine(tp_size=N)`: rank 0 here, followers as child processes over
NCCL); a TP worker runs without CUDA graphs and without the overlapped loop, so the tp 1 row is
shown both ways (its default, and as TP runs it) to separate the TP split from those two.
Prefill + decode with different degrees (P tp 2 -> D tp 1 over nccl) is checked by
tests/worker/test_tensor_parallel_gpu.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from device_timer import wall  # noqa: E402
from engine_bench import time_steps  # noqa: E402

from pdserve.config.sampling_params import SamplingParams  # noqa: E402
from pdserve.entrypoints.engine import Engine  # noqa: E402
from pdserve.scheduler.request import Request  # noqa: E402


def prefilled(core, batch: int, context: int, tag: str) -> list[Request]:  # type: ignore[no-untyped-def]
    """`batch` greedy requests of `context` prompt tokens, each past its first token."""
    params = SamplingParams(max_new_tokens=100_000, ignore_eos=True, temperature=0.0)
    reqs = []
    for i in range(batch):
        prompt = [(i * 7919 + j * 31) % 400 + 3 for j in range(context)]
        reqs.append(Request(rid=f"{tag}{i}", prompt_ids=prompt, sampling=params))
        core.add(reqs[-1])
    while not all(r.output_ids for r in reqs):
        core.step()
    return reqs


def greedy(engine: Engine, prompts: list[list[int]], new: int) -> list[list[int]]:
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    return [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=params)]


def run(model: Path, args: argparse.Namespace) -> list[tuple]:
    options = dict(in_process=True, device=args.device, dtype=args.dtype, page_size=16,
                   num_pages=max(args.batches) * (args.context + args.steps + 64) // 16 + 64)  # fmt: skip
    check = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [42]]
    rows, want = [], None
    configs = [(1, {}), (1, {"cuda_graph": False, "overlap_schedule": False})]
    configs += [(tp, {}) for tp in args.tps if tp > 1]
    for tp, extra in configs:
        if args.device == "cpu":
            extra = {k: v for k, v in extra.items() if k != "cuda_graph"}
        label = f"tp {tp}" + (" (no graphs, plain loop)" if extra else "")
        t0 = time.perf_counter()
        with Engine(str(model), tp_size=tp, **options, **extra) as engine:
            got = greedy(engine, check, 16)
            want = want if want is not None else got
            same = "yes" if got == want else "NO"
            for batch in args.batches:
                reqs = prefilled(engine.core, batch, args.context, f"{tp}-{batch}-")
                step_s, _ = time_steps(engine.core, args.device, args.steps)
                rows.append((label, batch, step_s * 1e3, batch / step_s, same))
                for r in reqs:
                    engine.core.abort(r.rid)
                while engine.core.has_work():
                    engine.core.step()
        wall(args.device)
        print(f"[{label}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny model, tp 1 and 2")
    p.add_argument("--shape", choices=["1b", "8b"], default="8b")
    p.add_argument("--tps", default=None, help="default: powers of two up to the GPU count")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        from pdserve.tiny_model import build_tiny_model

        model = build_tiny_model(Path("/tmp/pdserve-tp-bench-tiny"))
        args.device, args.dtype, args.context, args.steps = "cpu", "float32", 16, 4
        args.tps = [int(t) for t in (args.tps or "1,2").split(",")]
    else:
        if not torch.cuda.is_available():
            sys.exit("tp_bench needs CUDA GPUs (or --smoke)")
        import random_checkpoint as rc

        spec = rc.LLAMA_8B if args.shape == "8b" else rc.LLAMA_1B
        model = rc.write_checkpoint(spec, Path("/dev/shm/pdserve-bench") / spec.name, "cuda")
        args.device, args.dtype = "cuda", "bfloat16"
        count = torch.cuda.device_count()
        default = [2**k for k in range(count.bit_length()) if 2**k <= count]
        args.tps = [int(t) for t in args.tps.split(",")] if args.tps else default
    rows = run(model, args)
    base = {b: ms for label, b, ms, _, _ in rows if label == "tp 1"}
    print(f"\ncontext {args.context}, {args.steps} decode steps back to back, {args.dtype}")
    print("| engine | batch | ms/step | tokens/s | vs tp 1 | greedy = tp 1 |")
    print("|---|---|---|---|---|---|")
    for label, batch, ms, tok_s, same in rows:
        print(f"| {label} | {batch} | {ms:.2f} | {tok_s:,.0f} | {base[batch] / ms:.2f}x | {same} |")


if __name__ == "__main__":
    main()
