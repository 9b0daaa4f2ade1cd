"""The host's cost of queuing one sampling draw (issue 18: on a slow host, a constrained batch-64
step is bound by the host, not the GPU), in one call: microseconds of host time per call of each
piece of the light path, against the same draw replayed from a CUDA graph, and against a plain
torch launch as the host's own speed reference.

    python benchmarks/gpu/draw_launch_bench.py            # batch 64, 128k vocabulary, ~20 s
    python benchmarks/gpu/draw_launch_bench.py --smoke    # CPU: the pieces that run there

Each figure is the median over rounds of `--calls` back-to-back calls (fewer than the device's
launch queue holds, so the host never waits for the device); the device is synchronized between
rounds. The graph's replay is checked to draw the same tokens as the eager kernel first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request
from pdserve.scheduler.scheduler import BatchItem
from pdserve.worker.device_copy import current_stream, host_buffer, record_event
from pdserve.worker.draw_graphs import DrawGraphs, DrawLayout
from pdserve.worker.light_sampling import LightSampler
from pdserve.worker.race_sampling import greedy_draw, race_draw


def host_us(fn: Callable[[], Any], calls: int, rounds: int, sync: Callable[[], None]) -> float:
    """Median over rounds of the host microseconds per call of `calls` back-to-back calls."""
    fn()
    sync()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return statistics.median(samples)


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid and arguments, then launches."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def triton_launch_rows(race: Callable[[], torch.Tensor]) -> list[tuple[str, Callable[[], Any]]]:
    """Where the race kernel's launch goes: the same launch (its arguments recorded from a
    race_draw) through Triton's JIT call, and straight through the compiled kernel's launcher
    (`CompiledKernel.run`, Triton's internals: skipped with a note where they differ), checked to
    draw the JIT call's tokens first. What a launcher that skips Triton's binding would save in
    the steps that launch kernels eagerly (a mixed step's attention, ~2 a layer)."""
    import pdserve.kernels.triton_sampling as ts

    real = ts._chunk_kernel
    recorder = _Recorder(real)
    ts._chunk_kernel = recorder
    try:
        race()
    finally:
        ts._chunk_kernel = real
    grid, args, kwargs = recorder.calls[-1]
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("race kernel: Triton's JIT call alone", lambda: real[grid](*args, **kwargs))
    ]
    try:
        compiled = real[grid](*args, **kwargs)
        binder = real.device_caches[torch.cuda.current_device()][-1]
        bound = list(binder(*args, **kwargs)[0].values())
        stream = torch.cuda.current_stream().cuda_stream
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]

        def direct() -> None:
            compiled.run(
                g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None,
                None, *bound,
            )  # fmt: skip

        tokens = args[10]  # the recorded launch's `out` (triton_sampling.race_sample: common[10])
        want = tokens.clone()
        tokens.zero_()
        direct()
        torch.cuda.synchronize()
        if torch.equal(tokens, want):
            rows.append(("race kernel: CompiledKernel.run (no binding)", direct))
        else:
            print("note: the direct launch's tokens differ from the JIT call's; row left out")
    except Exception as exc:  # Triton's internals differ in this version
        print(f"note: no direct launch through Triton's internals here ({exc!r})")
    return rows


def light_items(batch: int, temperature: float) -> list[BatchItem]:
    items = []
    for i in range(batch):
        params = SamplingParams(max_new_tokens=64, temperature=temperature, seed=i)
        req = Request(rid=f"r{i}", prompt_ids=[1, 2, 3], sampling=params)
        req.output_ids = [5] * 17
        req.checked_sampling = params
        items.append(BatchItem(req, 20, 1))
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, small shapes: the script runs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    if args.smoke:
        device, args.batch, args.vocab, args.calls, args.rounds = "cpu", 8, 1024, 20, 3
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        raise SystemExit("draw_launch_bench needs a CUDA GPU (or --smoke)")
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch, vocab = args.batch, args.vocab
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, vocab, device=device, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.full((batch, words), -1, dtype=torch.int32, device=device)
    temps = torch.ones(batch, device=device)
    min_ps = torch.zeros(batch, device=device)
    greedy = torch.zeros(batch, device=device)
    keys = torch.randint(0, 2**32, (batch, 2), device=device, generator=gen)
    sampler = LightSampler(0)
    items = light_items(batch, 1.0)
    scratch = torch.empty(64, device=device)
    staged, _ = host_buffer((batch * (16 + 12) + batch * words * 4,), torch.uint8, device)

    def race() -> torch.Tensor:
        return race_draw(logits, temps, min_ps, greedy, keys, bitmask, any_min_p=False)

    rows: list[tuple[str, Callable[[], Any]]] = [
        ("torch add_ (the host's speed reference)", lambda: scratch.add_(1.0)),
        ("greedy draw (race kernel, all greedy)", lambda: greedy_draw(logits)),
        ("temperature draw with a bitmask (race kernel)", race),
        (f"light prepare ({batch} rows' keys and parameters)",
         lambda: sampler.prepare(logits, items, False)),
        ("light prepare + launch", lambda: sampler.sample(logits, items)),
        ("host-to-device copy of a draw's inputs", lambda: staged.to(device, non_blocking=True)),
    ]  # fmt: skip
    # What the worker runs over a decode graph's logits: the draw replayed (draw_graphs.py).
    graphs = DrawGraphs(torch.device(device))
    graphs.add_logits_buffer(logits)
    replaying = LightSampler(0, graphs)
    greedy_layout = DrawLayout(batch, 0, 0, False)
    rows += [
        ("greedy draw (DrawGraphs)", lambda: graphs.draw(logits, greedy_layout, None)),
        ("light prepare + launch (DrawGraphs)", lambda: replaying.sample(logits, items)),
    ]
    if cuda:
        out = torch.empty(batch, dtype=torch.int64, device=device)
        eager = race()
        race_draw(logits, temps, min_ps, greedy, keys, bitmask, any_min_p=False, out=out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            race_draw(logits, temps, min_ps, greedy, keys, bitmask, any_min_p=False, out=out)
        out.zero_()
        graph.replay()
        sync()
        if not torch.equal(out, eager):
            raise SystemExit("the graph's draw differs from the eager kernel's")
        rows.append(("temperature draw with a bitmask (graph replay)", graph.replay))
        rows += triton_launch_rows(race)
        # Each staged copy and each step's read-back records an event (device_copy.py).
        dev = torch.device("cuda", torch.cuda.current_device())
        kept = torch.cuda.Event()
        rows += [
            ("torch.cuda.current_stream()", torch.cuda.current_stream),
            ("new torch.cuda.Event() + record() (current stream looked up)",
             lambda: torch.cuda.Event().record()),
            ("device_copy.current_stream (the stream's object kept)",
             lambda: current_stream(dev)),
            ("an event recorded again on the kept stream (the ring's)",
             lambda: record_event(dev, kept)),
        ]  # fmt: skip
    print(f"device {device}, batch {batch}, vocabulary {vocab}; host us per call:")
    print("| what | host us / call |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {host_us(fn, args.calls, args.rounds, sync):.1f} |", flush=True)


if __name__ == "__main__":
    main()
