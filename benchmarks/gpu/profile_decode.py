"""Where a decode step's time goes on the GPU: host phases timed with synchronization, then
torch.profiler's top CPU and CUDA entries.

    python benchmarks/gpu/profile_decode.py [--batch 1] [--steps 50] [--context 128]
    ... --prefill-chunk 1024   # each step also carries one 1,024-token prompt (a mixed step, as
                               # under a burst of new requests: decode_step_prefill_tokens)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402

from pdserve.config.sampling_params import SamplingParams  # noqa: E402
from pdserve.entrypoints.engine import Engine  # noqa: E402
from pdserve.scheduler.request import Request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--schema", action="store_true", help="under grammar_bench's JSON schema")
    parser.add_argument(
        "--prefill-chunk", type=int, default=0, help="a prompt of this many tokens in every step"
    )
    parser.add_argument("--cprofile", action="store_true", help="also cProfile 10 core.step()s")
    parser.add_argument(
        "--fused-decode", action=argparse.BooleanOptionalAction, default=None,
        help="set attention.TRITON_FUSED_DECODE (rotary + KV store inside the decode kernel)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.fused_decode is not None:
        from pdserve.kernels import attention

        attention.TRITON_FUSED_DECODE = args.fused_decode
    model = rc.write_checkpoint(rc.LLAMA_1B, Path("/dev/shm/pdserve-bench/llama-3.2-1b"), "cuda")
    pages = max(4096, args.batch * (args.context + 20 + 3 * args.steps) // 16 + 64)
    chunk = args.prefill_chunk
    pages += 4 * chunk // 16
    extra = {"chunk_size": chunk, "decode_step_prefill_tokens": chunk} if chunk else {}
    engine = Engine(
        str(model), in_process=True, device="cuda", dtype="bfloat16", num_pages=pages,
        max_running_requests=max(args.batch + 2, 256), cuda_graph_max_batch=max(args.batch, 256),
        **extra,
    )  # fmt: skip
    core, runner = engine.core, engine.core.runner
    grammar = {}
    if args.schema:
        from grammar_bench import BENCH_SCHEMA

        grammar = {"json_schema": json.dumps({**BENCH_SCHEMA, "minItems": 1000})}
    for i in range(args.batch):
        params = SamplingParams(
            max_new_tokens=10_000, ignore_eos=True, temperature=args.temperature, seed=i, **grammar
        )
        core.add(
            Request(
                rid=f"r{i}",
                prompt_ids=[(i * 7 + j) % 1000 + 3 for j in range(args.context)],
                sampling=params,
            )
        )
    for _ in range(20):
        core.step()
    if chunk:  # one fresh prompt per step from here on (its one token ends it)
        for i in range(40 + 3 * args.steps):
            prompt = [(i * 13 + j) % 5000 + 3 for j in range(chunk)]
            params = SamplingParams(max_new_tokens=1, ignore_eos=True)
            core.add(Request(rid=f"p{i}", prompt_ids=prompt, sampling=params))
        for _ in range(3):
            core.step()
    core._collect()  # the overlapped loop's last tokens: the phases below step unoverlapped
    phases = {"schedule": 0.0, "build_batch": 0.0, "forward": 0.0, "sample+record": 0.0}
    sync = torch.cuda.synchronize
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        batch = core.scheduler.schedule()
        t1 = time.perf_counter()
        fb = runner.build_forward_batch(batch)
        sync()
        t2 = time.perf_counter()
        if runner.graph_runner is not None and runner.graph_runner.can_run(fb):
            logits = runner.graph_runner.replay(fb)
        else:
            logits = runner.model(fb, runner.kv_pool)
        sync()
        t3 = time.perf_counter()
        core.scheduler.advance(batch)
        core._sample_and_record(logits, batch.items)
        sync()
        t4 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key] += dt
    print("graphs:", runner.graph_runner is not None and bool(runner.graph_runner.batch_sizes))
    for key, total in phases.items():
        print(f"{key:>14}: {total / args.steps * 1e3:.3f} ms/step")
    start = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    sync()
    print(f"core.step: {(time.perf_counter() - start) / args.steps * 1e3:.3f} ms/step")
    if args.cprofile:  # the host's share of core.step, by function
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            core.step()
        sync()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(10):
            core.step()
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(table)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
