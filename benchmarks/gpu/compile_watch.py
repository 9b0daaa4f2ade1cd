"""Kernels compiled after a worker's warm-up: the first clients' steps should find every Triton
specialization they need already compiled (a compile stalls the step for tenths of a second; the
first concurrent load of a fresh mixed worker measured TTFT 105 ms against 40-47 ms for the same
load repeated, docs/BENCHMARKS.md eleventh session).

An in-process Engine (Llama-3.2-1B shape, random bf16 weights; its warm-up runs as a server's
does) serves a closed loop of --concurrency clients: --requests prompts of --input-len random
tokens, --output-len tokens each, a new prompt added whenever one finishes. Every Triton compile
after the warm-up is logged (kernel and specialization, through triton.knobs'
jit_cache_hook), with the steps that took longest. The load runs twice: the second round
should compile nothing.

    python benchmarks/gpu/compile_watch.py
    python benchmarks/gpu/compile_watch.py --concurrency 16 --requests 48 --input-len 1024
    python benchmarks/gpu/compile_watch.py --smoke      # tiny shapes on the CPU: the plumbing
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402
from engine_bench import make_engine, new_request, random_prompts  # noqa: E402


class CompileLog:
    """Triton's jit_cache_hook: called on each in-memory cache miss (a compile, or a load from
    Triton's disk cache), before the kernel runs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []  # (kernel name, specialization)

    def install(self) -> bool:
        try:
            from triton import knobs
        except ImportError:  # no Triton (CPU smoke): nothing compiles
            return False
        if not hasattr(knobs.runtime, "jit_cache_hook"):  # an older Triton: the slow steps tell
            return False
        knobs.runtime.jit_cache_hook = self._hook
        return True

    def _hook(self, *args: Any, **kwargs: Any) -> bool:
        text = str(kwargs.get("repr", ""))  # "name[options](arg: type, ...)"
        name, _, rest = text.partition("[")
        self.events.append((name or "?", rest[:1500]))
        return False  # compile as usual


def serve_round(engine: Any, spec: Any, args: Any, seed: int) -> dict[str, Any]:
    """The closed loop once: step times and how many requests finished."""
    core = engine.core
    rng = np.random.default_rng(seed)
    prompts = random_prompts(rng, args.requests, args.input_len, spec.vocab_size)
    waiting = [new_request(p, args.output_len) for p in prompts]
    live: list[Any] = []
    step_s: list[float] = []
    done = 0
    while waiting or live:
        while waiting and len(live) < args.concurrency:
            live.append(waiting.pop(0))
            core.add(live[-1])
        t0 = time.perf_counter()
        core.step()
        step_s.append(time.perf_counter() - t0)
        finished = [r for r in live if r.is_finished]
        done += len(finished)
        live = [r for r in live if not r.is_finished]
    return {"steps": len(step_s), "done": done, "step_s": step_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=16)
    args = p.parse_args()
    if args.smoke:
        spec, device, dtype, root = rc.SMOKE_1B, "cpu", "float32", "/tmp/pdserve-bench-smoke"
        args.concurrency, args.requests, args.input_len, args.output_len = 3, 6, 40, 4
        options = {"num_pages": 512, "page_size": 4, "max_running_requests": 8}
    else:
        spec, device, dtype, root = rc.LLAMA_1B, "cuda", "bfloat16", "/dev/shm/pdserve-bench"
        options = {"num_pages": 8192, "max_running_requests": 64, "cuda_graph_max_batch": 64}
    model = rc.write_checkpoint(spec, Path(root) / spec.name, device)
    engine = make_engine(model, device, dtype, "auto", **options)  # its warm-up runs here
    log = CompileLog()
    watching = log.install()
    failed = False
    for rnd in (1, 2):
        seen = len(log.events)
        r = serve_round(engine, spec, args, seed=rnd)
        compiles = log.events[seen:]
        slow = sorted(range(r["steps"]), key=lambda i: -r["step_s"][i])[:5]
        print(f"round {rnd}: {r['done']}/{args.requests} requests in {r['steps']} steps, "
              f"{sum(r['step_s']):.2f} s; Triton compiles after the warm-up: "
              f"{len(compiles) if watching else 'not watched (no Triton)'}")  # fmt: skip
        for name, spec_repr in compiles:
            print(f"  compiled {name}: {spec_repr}")
        print("  slowest steps: " + ", ".join(
            f"#{i} {r['step_s'][i] * 1e3:.1f} ms" for i in slow))  # fmt: skip
        failed |= r["done"] != args.requests
    engine.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
