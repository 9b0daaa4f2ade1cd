"""The overlapped worker loop against the plain one, and against the device's own time, in one call.

For each batch size, one engine decodes a full batch of greedy requests; the same core runs steps
with overlap on and off (`WorkerCore.overlap`), and a back-to-back replay of the step's CUDA graph
gives the device-only floor (no host work at all). The greedy tokens of both loops are compared
first.

    python benchmarks/gpu/overlap_bench.py [--batches 1,64,256] [--context 1024] [--steps 100]
    python benchmarks/gpu/overlap_bench.py --smoke   # tiny model on the CPU (the test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import random_checkpoint as rc  # noqa: E402

from pdserve.config.sampling_params import SamplingParams  # noqa: E402
from pdserve.entrypoints.engine import Engine  # noqa: E402
from pdserve.scheduler.request import Request  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fill(core, batch: int, context: int, tag: str) -> list[Request]:  # type: ignore[no-untyped-def]
    """`batch` greedy requests with `context`-token prompts, prefilled and decoding."""
    params = SamplingParams(max_new_tokens=100_000, ignore_eos=True, temperature=0.0)
    reqs = []
    for i in range(batch):
        prompt = [(i * 7919 + j * 31) % 400 + 3 for j in range(context)]
        req = Request(rid=f"{tag}{i}", prompt_ids=prompt, sampling=params)
        core.add(req)
        reqs.append(req)
    for _ in range(10 * batch + context):
        if all(len(r.output_ids) >= 2 for r in reqs):
            return reqs
        core.step()
    raise SystemExit(f"batch {batch} x {context} tokens did not start decoding: pool too small?")


def ms_per_step(core, device: str, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median over 5 runs of `steps` steps, each run ended by reading every token back."""
    runs = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            core.step()
        core.overlap, was = False, core.overlap
        core.step()  # drains the step still running (counted: it is one more step)
        core.overlap = was
        sync(device)
        runs.append((time.perf_counter() - start) / (steps + 1) * 1e3)
    return statistics.median(runs)


def device_floor_ms(core, reqs: list[Request], steps: int) -> float | None:  # type: ignore[no-untyped-def]
    """A decode step's CUDA graph replayed back to back: the device's time alone."""
    runner = core.runner
    if runner.graph_runner is None:
        return None
    from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch

    # Each request's last known token again (its KV slot is rewritten with the same values).
    known = [len(r.prompt_ids) + len(r.output_ids) for r in reqs]
    batch = ScheduledBatch([BatchItem(r, n - 1, 1) for r, n in zip(reqs, known)])
    fb = runner.build_forward_batch(batch)
    if not runner.graph_runner.can_run(fb):
        return None
    runner.graph_runner.replay(fb)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.graph_runner.replay(fb)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def check_same_tokens(core, num: int) -> None:  # type: ignore[no-untyped-def]
    """Greedy tokens with overlap on equal those with it off, for one batch of requests."""
    outputs = {}
    for overlap in (False, True):
        core.overlap = overlap
        core.scheduler.cache.reset()  # both runs compute every prompt token
        params = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.0)
        reqs = []
        for i in range(num):
            prompt = [(i * 131 + j * 17) % 400 + 3 for j in range(40 + i)]
            req = Request(rid=f"check{overlap}{i}", prompt_ids=prompt, sampling=params)
            core.add(req)
            reqs.append(req)
        while core.has_work():
            core.step()
        outputs[overlap] = [r.output_ids for r in reqs]
    same = outputs[False] == outputs[True]
    print(
        f"greedy tokens, overlap on vs off ({num} requests x 24): {'equal' if same else 'DIFFER'}"
    )
    if not same:
        raise SystemExit("the overlapped loop changed the tokens")


def profile_host(core, batch: int, context: int, steps: int) -> None:  # type: ignore[no-untyped-def]
    """cProfile of `steps` overlapped steps: where the host's time goes."""
    import cProfile
    import pstats

    reqs = fill(core, batch, context, "prof-")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        core.step()
    profiler.disable()
    print(f"\nhost profile, batch {batch}, {steps} overlapped steps (cumulative, top 30):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    for req in reqs:
        core.abort(req.rid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument(
        "--profile", type=int, default=0, help="then profile the host side at this batch size"
    )
    args = parser.parse_args()
    if args.smoke:
        from pdserve.tiny_model import build_tiny_model

        model = build_tiny_model(Path("/tmp/pdserve-overlap-smoke"))
        device, dtype, batches, context, steps = "cpu", "float32", [1, 4], 16, 3
    else:
        spec = rc.LLAMA_1B
        model = rc.write_checkpoint(spec, Path("/dev/shm/pdserve-bench/llama-3.2-1b"), "cuda")
        device, dtype = "cuda", "bfloat16"
        batches = [int(b) for b in args.batches.split(",")]
        context, steps = args.context, args.steps
    pages = max(batches + [args.profile]) * (context + 8 * steps + 64) // 16 + 64
    engine = Engine(
        str(model), in_process=True, device=device, dtype=dtype, num_pages=pages, page_size=16
    )
    core = engine.core
    check_same_tokens(core, 8)
    rows = []
    for batch in batches:
        reqs = fill(core, batch, context, f"b{batch}-")
        floor = device_floor_ms(core, reqs, steps)
        core.overlap = False
        plain = ms_per_step(core, device, steps)
        core.overlap = True
        overlapped = ms_per_step(core, device, steps)
        rows.append((batch, floor, plain, overlapped))
        for req in reqs:
            core.abort(req.rid)
        core.overlap = False
        core.step()  # drains
        core.overlap = True
    if args.profile:
        profile_host(core, args.profile, context, steps)
    print(f"\ncontext {context}, {steps} steps a run, median of 5 runs")
    print("| batch | device-only ms/step | plain loop | overlapped | overlapped ÷ device-only |")
    print("|---|---|---|---|---|")
    for batch, floor, plain, overlapped in rows:
        ratio = f"{overlapped / floor:.2f}×" if floor else "—"
        floor_text = f"{floor:.3f}" if floor else "—"
        print(f"| {batch} | {floor_text} | {plain:.3f} | {overlapped:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
