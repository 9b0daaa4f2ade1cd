"""Structured output on the GPU in one call (issue 18): decode throughput at batch 64 with a JSON
schema against unconstrained decoding, on one engine, in alternating rounds.

    python benchmarks/gpu/grammar_bench.py            # Llama-1B shape, random weights, ~2 min
    python benchmarks/gpu/grammar_bench.py --smoke    # tiny shapes on the CPU: the plumbing only
    ... --phases          # host microseconds per step inside the core's methods, per mode
    ... --compare-defer   # also the schema modes with the other `defer_grammar_draws` setting
    ... --compare-accept  # also the schema modes with the tokens accepted on the fill thread
    ... --compare-draw-graphs  # also every mode with eager draws (no draw graph replays)
    ... --compare-graph-feed   # also every mode with decode steps built the general way
    ... --profile [T]     # then cProfile of 20 constrained steps at temperature T (0)

64 requests of 512 random prompt tokens are prefilled, then 20 pure decode steps are timed back to
back (CUDA graphs on, the engine's default overlapped loop), four ways: greedy and
temperature 1 (seeded), each unconstrained and under BENCH_SCHEMA. The schema asks for at least 64
objects, so no constrained request can end inside the timed steps (each step is checked to hold
every request). Also measured: the host time of one bitmask fill for the 64 rows at the states
the timed steps left them in. Target (issue 18): the schema's throughput >= 90% of unconstrained.
Writes grammar_bench.json and grammar_bench.md under $OUT (or /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402
from engine_bench import finish_all, free_device_memory, step_until, time_steps  # noqa: E402

from pdserve.config.sampling_params import SamplingParams  # noqa: E402
from pdserve.scheduler.request import Request  # noqa: E402

BENCH_SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "name": {"type": "string", "maxLength": 24},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "score", "tags", "ok"],
    },
}
MODES = (  # (name, temperature, constrained)
    ("greedy, unconstrained", 0.0, False),
    ("greedy, JSON schema", 0.0, True),
    ("temperature 1, unconstrained", 1.0, False),
    ("temperature 1, JSON schema", 1.0, True),
)
# --compare-defer: the schema modes with the worker's other setting of defer_grammar_draws
NO_DEFER = " (draw not deferred)"  # the draw queued in its own step, the bitmask filled inline
DEFER = " (draw deferred)"  # the draw queued after the next batch's build, filled on a thread
ON_THREAD = " (accept on the fill thread)"  # --compare-accept: GrammarAccept instead of inline
EAGER = " (eager draws)"  # --compare-draw-graphs: no draw replays a graph (worker/draw_graphs.py)
# --compare-graph-feed: decode steps built as a ForwardBatch, then copied into the graph's inputs
NO_FEED = " (no graph feed)"  # (ModelRunner.graph_feed off: worker/graph_feed.py)
VARIANTS = (EAGER, NO_FEED)  # each compared with the unconstrained mode of its own variant


def make_engine(model_dir: Path, args: Any) -> Any:
    from pdserve.entrypoints.engine import Engine

    return Engine(
        str(model_dir), in_process=True, device=args.device, dtype=args.dtype,
        cuda_graph=args.device == "cuda", num_pages=args.num_pages,
        max_running_requests=args.batch, cuda_graph_max_batch=args.batch,
    )  # fmt: skip


def host_probe_us() -> float:
    """Host microseconds of a fixed pure-Python loop (the best of 3), taken before each mode's
    run: lent hosts and their rounds differ in speed, and a constrained step is the host's."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sum(range(100_000))
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def bitmask_fill_us(reqs: list[Request], vocab_size: int) -> float:
    """Host microseconds of one bitmask fill for the requests' matchers (median of 20)."""
    from pdserve.worker.grammar_mask import fill_bitmask

    grammars = [r.grammar for r in reqs if r.grammar is not None and not r.is_finished]
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        fill_bitmask(grammars, vocab_size)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


class PhaseTimer:
    """Host seconds spent inside some of the core's methods (inclusive; nested ones overlap),
    by wrapping them on the instance: where a constrained step's host time goes, without a
    profiler's overhead."""

    def __init__(self, core: Any) -> None:
        self.totals: dict[str, float] = {}
        targets = {
            "schedule": (core.scheduler, "schedule"),
            "launch (build + forward)": (core, "_launch"),
            "collect (wait + record)": (core, "_collect"),
            "record tokens": (core.scheduler, "process_sampled"),
            "sample launch": (core, "_sample_launched"),
            "light sampler": (core.light_sampler, "sample"),
            "light prepare": (core.light_sampler, "prepare"),
        }
        # Inside the launch: a decode step fed to its graph (graph_feed.py: host build, copies,
        # pending fill, replay), or the general path (the batch's host build, its device views
        # and pending-token fill, the graph's input copies and the replay).
        runner = core.runner
        feed = getattr(runner, "graph_feed", None)
        if feed is not None:
            import pdserve.worker.graph_feed as graph_feed

            targets["  graph feed (host build, copies, pending fill, replay)"] = (feed, "replay")
            targets["    host build (decode_rows + pack_decode)"] = (graph_feed, "pack_decode")
            targets["    decode_rows"] = (graph_feed, "decode_rows")
            targets["    graph replay"] = (runner.graph_runner, "replay_loaded")
        targets["  build_forward_batch (host build, copy, device views)"] = (
            runner,
            "build_forward_batch",
        )
        targets["  device views + pending fill"] = (runner, "_device_batch")
        if runner.graph_runner is not None:
            targets["  general path: graph replay (input copies + launch)"] = (
                runner.graph_runner,
                "replay",
            )
            targets["  general path: graph input copies"] = (runner.graph_runner.inputs, "load")
        for name, (obj, attr) in targets.items():
            setattr(obj, attr, self._wrap(name, getattr(obj, attr)))
        import pdserve.worker.light_sampling as light

        fill_async = light.fill_bitmask_async

        def timed_fill(*a: Any, **k: Any) -> Any:  # the main thread's waits for the fill thread
            job = fill_async(*a, **k)
            job.wait = self._wrap("wait for the fill thread", job.wait)
            job.hand_over = self._wrap("fill hand-over after the accept", job.hand_over)
            return job

        light.fill_bitmask_async = timed_fill
        light.LightDraw.launch = self._wrap("light draw launch", light.LightDraw.launch)
        import pdserve.worker.grammar_mask as grammar_mask

        new_matcher = grammar_mask._new_batch_matcher
        timer = self

        class TimedMatcher:  # xgrammar's own fills, on whichever thread runs them
            def __init__(self) -> None:
                self.inner = new_matcher()
                self.batch_fill_next_token_bitmask = timer._wrap(
                    "bitmask fills (xgrammar, any thread)", self.inner.batch_fill_next_token_bitmask
                )

        grammar_mask._new_batch_matcher = TimedMatcher  # before the first fill makes one

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def per_step_us(self, steps: int) -> dict[str, float]:
        out = {k: round(v / steps * 1e6, 1) for k, v in self.totals.items()}
        self.totals = {}
        return out


def decode_steps(
    engine: Any, temperature: float, constrained: bool, args: Any, seed: int, profiler: Any = None
) -> dict[str, Any]:
    """Prefill `args.batch` prompts, time pure decode steps; `constrained`: under BENCH_SCHEMA."""
    core = engine.core
    vocab = core.runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    max_new = args.batch * args.context // 512 + args.warmup + args.steps + 64
    grammar = {"json_schema": json.dumps(BENCH_SCHEMA)} if constrained else {}
    reqs = []
    for i in range(args.batch):
        prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
        params = SamplingParams(
            max_new_tokens=max_new, ignore_eos=not constrained, temperature=temperature,
            seed=seed * 1000 + i if temperature > 0 else None, **grammar,
        )  # fmt: skip
        reqs.append(Request(rid=f"r{seed}-{i}", prompt_ids=prompt, sampling=params))
        core.add(reqs[-1])
    step_until(core, lambda: all(r.output_ids for r in reqs))
    for _ in range(args.warmup):
        core.step()
    if profiler is not None:
        profiler.enable()
    phases = getattr(core, "phase_timer", None)
    if phases is not None:
        phases.totals = {}
    step_s, sizes = time_steps(core, args.device, args.steps)
    if profiler is not None:
        profiler.disable()
    host_us = phases.per_step_us(args.steps) if phases is not None else None
    fill_us = bitmask_fill_us(reqs, vocab) if constrained else None
    texts_ok = all(not r.is_finished or r.finish.kind == "length" for r in reqs)
    finish_all(core, reqs)
    return {
        "step_ms": step_s * 1e3,
        "tok_s": args.batch / step_s,
        "pure_decode": all(n == args.batch for n in sizes) and texts_ok,
        "bitmask_fill_us": fill_us,
        "host_us": host_us,
    }


def run(model_dir: Path, args: Any, say: Any) -> list[dict[str, Any]]:
    engine = make_engine(model_dir, args)
    if args.phases:
        engine.core.phase_timer = PhaseTimer(engine.core)
    modes = list(MODES)
    shipped_defer = engine.core.defer_grammar_draws
    shipped = engine.core.accept_on_fill_thread
    if args.compare_defer:
        other = NO_DEFER if shipped_defer else DEFER
        modes += [(name + other, t, c) for name, t, c in MODES if c]
    if args.compare_accept:  # the accept on the thread exists only in deferred draws' steps
        modes += [(name + ON_THREAD, t, c) for name, t, c in MODES if c]
    if args.compare_draw_graphs:
        modes += [(name + EAGER, t, c) for name, t, c in MODES]
    if args.compare_graph_feed:
        modes += [(name + NO_FEED, t, c) for name, t, c in MODES]
    draw_graphs = engine.core.light_sampler.graphs
    graph_feed = getattr(engine.core.runner, "graph_feed", None)
    for _, temperature, constrained in MODES:  # warm-up: graphs, compiles, allocator
        decode_steps(engine, temperature, constrained, args, seed=900)
    rounds: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for name, temperature, constrained in modes:
            engine.core.defer_grammar_draws = (
                shipped_defer or name.endswith((DEFER, ON_THREAD))
            ) and not name.endswith(NO_DEFER)
            engine.core.accept_on_fill_thread = shipped or name.endswith(ON_THREAD)
            engine.core.light_sampler.graphs = None if name.endswith(EAGER) else draw_graphs
            engine.core.runner.graph_feed = None if name.endswith(NO_FEED) else graph_feed
            probe = host_probe_us()
            r = decode_steps(engine, temperature, constrained, args, seed=10 * rnd + 1)
            r["host_probe_us"] = probe
            rounds.setdefault(name, []).append(r)
            say(f"round {rnd} {name}: {r['step_ms']:.3f} ms/step (host probe {probe:.0f} us)")
            if r["host_us"] is not None:
                say(f"  host us/step: {r['host_us']}")
    if args.profile is not None:  # where the host's time goes in constrained steps
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        decode_steps(engine, args.profile, True, args, seed=77, profiler=profiler)
        print(
            f"host profile: {args.steps} JSON-schema steps at temperature {args.profile} "
            "(tottime, then cumtime)"
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    engine.core.defer_grammar_draws = shipped_defer
    engine.core.accept_on_fill_thread = shipped
    engine.core.light_sampler.graphs = draw_graphs
    engine.core.runner.graph_feed = graph_feed
    results = []
    for name, temperature, constrained in modes:
        rs = rounds[name]
        step_ms = statistics.median(r["step_ms"] for r in rs)
        fills = [r["bitmask_fill_us"] for r in rs if r["bitmask_fill_us"] is not None]
        results.append({
            "mode": name, "temperature": temperature, "constrained": constrained,
            "batch": args.batch, "step_ms": step_ms, "tok_s": args.batch / step_ms * 1e3,
            "pure_decode": all(r["pure_decode"] for r in rs),
            "bitmask_fill_us": statistics.median(fills) if fills else None,
            "rounds_ms": [round(r["step_ms"], 3) for r in rs],
            "host_probe_us": [round(r["host_probe_us"]) for r in rs],
        })  # fmt: skip
    del engine
    free_device_memory()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | ms/step | tokens/s | vs unconstrained | bitmask fill (host) | rounds (ms) "
        "| host probe before each round (us) |",
        "|---|---|---|---|---|---|---|",
    ]

    # Against the unconstrained mode of the same variant (VARIANTS), else the plain one.
    def variant(mode: str) -> str:
        return next((v for v in VARIANTS if mode.endswith(v)), "")

    base = {(r["temperature"], variant(r["mode"])): r for r in results if not r["constrained"]}
    for r in results:
        key = (r["temperature"], variant(r["mode"]))
        ratio = base.get(key, base[r["temperature"], ""])["step_ms"] / r["step_ms"]
        fill = f"{r['bitmask_fill_us']:.0f} us" if r["bitmask_fill_us"] is not None else "-"
        flag = "" if r["pure_decode"] else " (not pure decode)"
        lines.append(
            f"| {r['mode']}{flag} | {r['step_ms']:.2f} | {r['tok_s']:,.0f} | {ratio:.0%} | {fill} "
            f"| {r['rounds_ms']} | {r['host_probe_us']} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU too): the script runs")
    p.add_argument("--root", default="/dev/shm/pdserve-bench")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-pages", type=int, default=8192)
    p.add_argument(
        "--profile", type=float, nargs="?", const=0.0, default=None, metavar="TEMPERATURE",
        help="then a host profile (cProfile) of JSON-schema steps at this temperature (0: greedy)",
    )  # fmt: skip
    p.add_argument("--phases", action="store_true", help="host time per step in core methods")
    p.add_argument(
        "--compare-defer", action="store_true",
        help="also the schema modes with the other defer_grammar_draws setting (the worker's "
        "default: the draw queued in its own step, the bitmask filled inline)",
    )  # fmt: skip
    p.add_argument(
        "--compare-draw-graphs", action="store_true",
        help="also every mode with the draws queued eagerly, not replayed from CUDA graphs",
    )  # fmt: skip
    p.add_argument(
        "--compare-graph-feed", action="store_true",
        help="also every mode with decode steps built as a ForwardBatch and copied into the "
        "graph's inputs (the general path), not fed to the graph directly",
    )  # fmt: skip
    p.add_argument(
        "--compare-accept", action="store_true",
        help="also the schema modes with the read-back tokens fed to the matchers on the fill "
        "thread (WorkerCore.accept_on_fill_thread)",
    )  # fmt: skip
    args = p.parse_args()
    args.device, args.dtype, args.spec = "cuda", "bfloat16", rc.LLAMA_1B
    if args.smoke:
        args.spec, args.batch, args.context, args.steps, args.rounds = rc.SMOKE_1B, 8, 32, 3, 1
        args.root, args.device, args.dtype, args.num_pages = (
            "/tmp/pdserve-bench-smoke", "cpu", "float32", 512)  # fmt: skip
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("grammar_bench needs a CUDA GPU (or --smoke)")
    out_dir = Path(os.environ.get("OUT") or "/tmp")
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    model_dir = rc.write_checkpoint(args.spec, Path(args.root) / args.spec.name, args.device)
    say(f"checkpoint ready: {model_dir}")
    results = run(model_dir, args, say)
    md = table(results)
    (out_dir / "grammar_bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "grammar_bench.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
