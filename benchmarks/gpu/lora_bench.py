"""LoRA on the GPU in one call (issue 12): the kernels' correctness and cost, then decode throughput
at batch 64 with 0, 1, 8 and 32 distinct adapters against the base model, for the folded path
(the slots' A rows inside each projection's weight: one matmul and one expand launch per LoRA'd
projection) and the split one it replaced (base matmul, shrink launch, expand launch).

    python benchmarks/gpu/lora_bench.py            # Llama-1B shape, random weights, about 5 min
    python benchmarks/gpu/lora_bench.py --smoke    # tiny shapes on the CPU: decode plumbing only

1. Model-level check on the LoRA engine's runner: decode batches mixing adapters and the base
   model; logits of the CUDA graph replay == eager folded with the Triton kernels == eager folded
   with the torch reference == eager split with the Triton kernels, and adapters change the logits.
2. Kernel cost: every layer's four projections for 64 rows over 8 adapters in one CUDA graph,
   base matmuls alone vs folded vs split (CUDA events); decode graph replays with and without
   adapters per engine; per projection of layer 0, eager.
3. Decode: 64 requests of 1,024 random prompt tokens, adapters assigned round-robin (rank 16, all
   seven projections), prefilled, then 20 pure decode steps timed back to back, CUDA graphs on;
   the base model is an engine without LoRA in the same process. Engines with 32 slots (folded,
   and split) and with 8 slots (the default max_loras_per_batch; folded, and split), measured in
   alternating rounds. 8 adapters again without graphs, for the graphs' share.
Writes lora_bench.json and lora_bench.md under $OUT (or /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint as rc  # noqa: E402
from engine_bench import finish_all, free_device_memory, step_until, time_steps  # noqa: E402

from pdserve.config.sampling_params import SamplingParams  # noqa: E402
from pdserve.scheduler.request import Request  # noqa: E402
from pdserve.scheduler.scheduler import BatchItem, ScheduledBatch  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_COUNTS = (0, 1, 8, 32)


def write_adapters(
    spec: rc.ModelSpec, root: Path, num: int, rank: int, device: str
) -> dict[str, Path]:
    """`num` random PEFT adapters (bf16, every projection, lora_alpha = 2 rank)."""
    from safetensors.torch import save_file

    from pdserve.config.engine_config import ModelConfig
    from pdserve.worker.lora.adapter import module_shapes

    shapes = module_shapes(ModelConfig.from_hf(root.parent / spec.name))
    out = {}
    for i in range(num):
        folder = root / f"a{i}"
        out[f"a{i}"] = folder
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device=device).manual_seed(100 + i)
        tensors = {}
        for layer in range(spec.num_layers):
            for m in MODULES:
                in_f, out_f = shapes[m]
                block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{block}.{m}"
                a = torch.randn(rank, in_f, generator=g, device=device) / in_f**0.5
                b = torch.randn(out_f, rank, generator=g, device=device) * 0.01
                tensors[f"{key}.lora_A.weight"] = a.bfloat16().cpu()
                tensors[f"{key}.lora_B.weight"] = b.bfloat16().cpu()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                  "target_modules": list(MODULES), "bias": "none"}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return out


def make_engine(
    model_dir: Path,
    adapters: dict[str, Path] | None,
    graphs: bool,
    args: Any,
    dtype: str = "",
    fold: bool = True,
) -> Any:
    """An in-process engine; with adapters, one slot each, the folded path unless `fold` is
    False (then its LoRA graphs are captured again on the split path)."""
    from pdserve.entrypoints.engine import Engine

    options: dict[str, Any] = dict(
        in_process=True, device=args.device, dtype=dtype or args.dtype,
        cuda_graph=graphs and args.device == "cuda",
        num_pages=args.num_pages, max_running_requests=args.batch,
        cuda_graph_max_batch=args.batch,
    )  # fmt: skip
    if adapters:
        options.update(
            lora_paths=[f"{n}={p}" for n, p in adapters.items()],
            max_loras_per_batch=len(adapters),
            max_lora_rank=args.rank,
        )
    engine = Engine(str(model_dir), **options)
    if adapters and not fold:
        use_split_path(engine)
    return engine


def use_split_path(engine: Any) -> None:
    """The split path on the engine's own slots, its CUDA graphs captured again on it."""
    from pdserve.worker.cuda_graph_runner import CudaGraphRunner

    runner = engine.core.runner
    runner.lora.weights.fold = False
    if runner.graph_runner is not None:
        runner.graph_runner = None
        free_device_memory()
        runner.graph_runner = CudaGraphRunner(runner)
        if getattr(runner, "graph_feed", None) is not None:  # decode steps feed the new graphs
            from pdserve.worker.graph_feed import GraphFeed

            runner.graph_feed = GraphFeed(
                runner.graph_runner, runner.page_size, runner._page_tables
            )


# ---------------------------------------------------------------------------- 1. model-level check


def _decode_batch(runner: Any, names: list[str | None], seed: int) -> ScheduledBatch:
    """Decode items over scattered pages of a random KV pool (page 0 left alone)."""
    gen = torch.Generator().manual_seed(seed)
    vocab, page = runner.model_config.vocab_size, runner.page_size
    pages = (torch.randperm(runner.num_pages - 1, generator=gen) + 1).tolist()
    items = []
    for name in names:
        seq_len = int(torch.randint(1, 1500, (1,), generator=gen))
        num_pages = -(-seq_len // page)
        ids = torch.randint(0, vocab, (seq_len,), generator=gen).tolist()
        req = SimpleNamespace(
            prompt_ids=ids[:-1], output_ids=ids[-1:], page_ids=pages[:num_pages], lora_name=name
        )
        pages = pages[num_pages:]
        items.append(BatchItem(req=req, start=seq_len - 1, num_tokens=1))  # type: ignore[arg-type]
    return ScheduledBatch(items)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


@torch.inference_mode()
def check_model(engine: Any, names: list[str]) -> dict[str, Any]:
    runner = engine.core.runner
    graphs = runner.graph_runner
    runner.kv_pool.buffer.normal_()
    weights = runner.lora.weights
    worst = {"graph_vs_kernels": 0.0, "kernels_vs_reference": 0.0, "folded_vs_split": 0.0,
             "lora_vs_base": 1e9}  # fmt: skip
    for bsz, seed in ((1, 1), (17, 2), (64, 3)):
        gen = torch.Generator().manual_seed(seed)
        row_names = [None if torch.rand(1, generator=gen) < 0.25 else names[i % len(names)]
                     for i in range(bsz)]  # fmt: skip
        row_names[0] = names[0]
        fb = runner._forward_batch(_decode_batch(runner, row_names, seed))
        assert graphs is not None and graphs.can_run(fb), "no graph for a batch with adapters"
        replayed = graphs.replay(fb).clone()
        kernels = runner.model(fb, runner.kv_pool)
        weights.fold = False
        split = runner.model(fb, runner.kv_pool)
        weights.fold = True
        fb.lora.use_kernels = False
        reference = runner.model(fb, runner.kv_pool)
        lora, fb.lora = fb.lora, None
        base = runner.model(fb, runner.kv_pool)
        lora_rows = sorted(set(lora.rows))
        worst["graph_vs_kernels"] = max(worst["graph_vs_kernels"], _rel(replayed, kernels))
        worst["kernels_vs_reference"] = max(worst["kernels_vs_reference"], _rel(kernels, reference))
        worst["folded_vs_split"] = max(worst["folded_vs_split"], _rel(kernels, split))
        worst["lora_vs_base"] = min(
            worst["lora_vs_base"], _rel(base[lora_rows], reference[lora_rows])
        )
    # Adapters must move the logits by far more than the kernels' rounding does.
    tol = 1e-3 if runner.dtype == torch.float32 else 5e-2  # bf16: 16 layers of rounding
    worst["ok"] = (
        worst["graph_vs_kernels"] <= tol
        and worst["kernels_vs_reference"] <= tol
        and worst["folded_vs_split"] <= tol
        and worst["lora_vs_base"] > 5 * worst["kernels_vs_reference"]
    )
    worst["dtype"] = str(runner.dtype)
    return worst


# ---------------------------------------------------------------------------- 2. kernel cost


def _median_us(replay: Any, num: int = 30) -> float:
    """GPU time of `replay()` (CUDA events): the median of `num` runs after 3 unmeasured."""
    samples = []
    for _ in range(num + 3):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        replay()
        t1.record()
        t1.synchronize()
        samples.append(t0.elapsed_time(t1) * 1e3)
    return statistics.median(samples[3:])


def _graph_us(fn: Any) -> float:
    """GPU time of `fn` captured in a CUDA graph."""
    fn()  # compiles, and builds the tiles outside the graph
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _median_us(graph.replay)


def _projections(engine: Any, num_rows: int, num_adapters: int) -> tuple[Any, dict, dict]:
    """(LoraBatch of num_rows rows over the engine's first adapters round-robin, the model's
    LoRA'd linears by (layer, projection), a random input per projection)."""
    from pdserve.worker.lora.lora_weights import model_linears

    runner = engine.core.runner
    names = runner.lora.names[:num_adapters]
    lora = runner.lora.prepare([names[i % num_adapters] for i in range(num_rows)])
    projs = runner.lora.weights.fused_w
    linears = {key: m for key, m in model_linears(runner.model).items() if key[1] in projs}
    kw = {"dtype": runner.dtype, "device": runner.device}
    xs = {p: torch.randn(num_rows, linears[(0, p)].weight.shape[1], **kw) for p in projs}
    return lora, linears, xs


@torch.inference_mode()
def layers_graph_time(engine: Any, num_rows: int, num_adapters: int) -> dict[str, float]:
    """Every layer's LoRA'd projections for num_rows rows in one CUDA graph: the base matmuls
    alone, folded (matmul over [W; A] + expand), split (matmul + shrink + expand); GPU us."""
    lora, linears, xs = _projections(engine, num_rows, num_adapters)
    weights = engine.core.runner.lora.weights

    def run(mode: str) -> None:
        for (layer, p), linear in linears.items():
            linear(xs[p]) if mode == "base" else lora.linear(layer, p, linear, xs[p])

    out = {}
    for mode in ("base", "folded", "split"):
        weights.fold = mode != "split"
        out[f"{mode}_us"] = _graph_us(lambda mode=mode: run(mode))
    weights.fold = True
    return out


@torch.inference_mode()
def kernel_cost(engine: Any, num_rows: int, num_adapters: int) -> list[dict[str, Any]]:
    """Per projection of layer 0, eager (host-bound): the base matmul, folded, split (us)."""
    from triton.testing import do_bench

    lora, linears, xs = _projections(engine, num_rows, num_adapters)
    weights = engine.core.runner.lora.weights
    rows = []
    for p, x in xs.items():
        linear = linears[(0, p)]
        base = do_bench(lambda linear=linear, x=x: linear(x), return_mode="median")
        row = {"proj": p, "matmul_us": base * 1e3}
        for label, fold in (("folded_us", True), ("split_us", False)):
            weights.fold = fold
            fn = lambda p=p, x=x, linear=linear: lora.linear(0, p, linear, x)  # noqa: E731
            row[label] = do_bench(fn, return_mode="median") * 1e3
        weights.fold = True
        rows.append(row)
    return rows


@torch.inference_mode()
def graph_gpu_time(engine: Any, num_adapters: int, batch: int) -> dict[str, float]:
    """GPU time of one decode graph replay at `batch` rows (median of 50), without and with
    `num_adapters` adapters: the kernels' cost without the host's."""
    runner = engine.core.runner
    names = runner.lora.names[:num_adapters]
    fb = runner._forward_batch(
        _decode_batch(runner, [names[i % num_adapters] for i in range(batch)], 7)
    )
    graphs = runner.graph_runner
    out = {}
    for label, lora in (("base_graph_us", None), ("lora_graph_us", fb.lora)):
        fb.lora = lora
        graphs.replay(fb)
        out[label] = _median_us(graphs.graphs[(batch, lora is not None)].replay, 50)
    return out


# ---------------------------------------------------------------------------- 3. decode


def decode_steps(engine: Any, adapters: list[str], args: Any, seed: int = 0) -> dict[str, Any]:
    """Prefill `args.batch` prompts (adapters round-robin; none: base), time pure decode steps."""
    core = engine.core
    vocab = engine.core.runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    max_new = args.batch * args.context // 512 + args.warmup + args.steps + 16
    reqs = []
    for i in range(args.batch):
        prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
        name = adapters[i % len(adapters)] if adapters else None
        reqs.append(Request(rid=f"r{seed}-{i}", prompt_ids=prompt, sampling=params, lora_name=name))
        core.add(reqs[-1])
    step_until(core, lambda: all(r.output_ids for r in reqs))
    for _ in range(args.warmup):
        core.step()
    step_s, sizes = time_steps(core, args.device, args.steps)
    finish_all(core, reqs)
    return {
        "step_ms": step_s * 1e3,
        "tok_s": args.batch / step_s,
        "pure_decode": all(n == args.batch for n in sizes),
    }


# ---------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU too): the script runs")
    p.add_argument("--root", default="/dev/shm/pdserve-bench")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-pages", type=int, default=8192)
    args = p.parse_args()
    args.device, args.dtype = "cuda", "bfloat16"
    args.spec = rc.LLAMA_1B
    if args.smoke:
        args.spec, args.batch, args.context, args.steps, args.root = (
            rc.SMOKE_1B, 8, 32, 3, "/tmp/pdserve-bench-smoke")  # fmt: skip
        args.device, args.dtype, args.num_pages, args.rounds = "cpu", "float32", 512, 1
    return args


def run_checks(model_dir: Path, adapters: dict[str, Path], args: Any, say: Any) -> list[dict]:
    """The model-level check in float32 (its own engine)."""
    names = list(adapters)[:8]
    engine = make_engine(model_dir, adapters, True, args, dtype="float32")
    check = check_model(engine, names)
    say(f"model check float32: {check}")
    del engine
    free_device_memory()
    return [{"check": check}]


FOLDED_32, SPLIT_32 = "LoRA folded, 32 slots", "LoRA split (old), 32 slots"
FOLDED_8, SPLIT_8 = "LoRA folded, 8 slots", "LoRA split (old), 8 slots"


def gpu_costs(engines: dict[str, Any], names: list[str], args: Any, say: Any) -> list[dict]:
    """The bf16 model check, and what LoRA costs on the GPU alone: decode graph replays and
    every layer's projections in one graph, per engine; eager cost per projection."""
    results: list[dict] = [{"check": check_model(engines[FOLDED_32], names[:8])}]
    say(f"model check bfloat16: {results[-1]}")
    for label in (FOLDED_32, SPLIT_32, FOLDED_8, SPLIT_8):
        r = {"engine": label, **graph_gpu_time(engines[label], 8, args.batch)}
        results.append({"graph_gpu": r})
        say(f"decode graph GPU time, {args.batch} rows, 8 adapters: {r}")
    for label in (FOLDED_32, FOLDED_8):
        r = {"engine": label, **layers_graph_time(engines[label], args.batch, 8)}
        results.append({"layers_graph": r})
        say(f"all layers' projections in one graph, {args.batch} rows, 8 adapters: {r}")
    results.append({"kernel_cost": kernel_cost(engines[FOLDED_32], args.batch, 8)})
    say(f"eager LoRA'd projections (host-bound), layer 0: {results[-1]}")
    return results


def run_decode(model_dir: Path, adapters: dict[str, Path], args: Any, say: Any) -> list[dict]:
    """The engines side by side (CUDA graphs on), measured in alternating rounds (GPU clocks
    drift over a run); then the folded path without graphs at 8 adapters."""
    names = list(adapters)
    first8 = dict(list(adapters.items())[:8])
    engines = {
        "base model": make_engine(model_dir, None, True, args),
        FOLDED_32: make_engine(model_dir, adapters, True, args),
        SPLIT_32: make_engine(model_dir, adapters, True, args, fold=False),
        FOLDED_8: make_engine(model_dir, first8, True, args),
        SPLIT_8: make_engine(model_dir, first8, True, args, fold=False),
    }
    results = gpu_costs(engines, names, args, say) if args.device == "cuda" else []
    plan = [("base model", 0)] + [(FOLDED_32, k) for k in ADAPTER_COUNTS]
    plan += [(SPLIT_32, 8), (FOLDED_8, 8), (SPLIT_8, 8)]
    for kind, k in plan:
        decode_steps(engines[kind], names[:k], args, seed=1000 + k)  # warm-up
    rounds: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for kind, k in plan:
            r = decode_steps(engines[kind], names[:k], args, seed=10 * rnd + k)
            rounds.setdefault((kind, k), []).append(r)
            say(f"round {rnd} {kind} adapters={k}: {r['step_ms']:.3f} ms")
    for (kind, k), rs in rounds.items():
        step_ms = statistics.median(r["step_ms"] for r in rs)
        results.append({
            "engine": kind, "graphs": True, "adapters": k, "step_ms": step_ms,
            "tok_s": args.batch / step_ms * 1e3, "pure_decode": all(r["pure_decode"] for r in rs),
            "rounds_ms": [round(r["step_ms"], 3) for r in rs],
        })  # fmt: skip
    del engines
    free_device_memory()
    eager = make_engine(model_dir, adapters, False, args)
    decode_steps(eager, names[:8], args, seed=98)
    r = decode_steps(eager, names[:8], args, seed=8)
    results.append({**r, "engine": FOLDED_32, "graphs": False, "adapters": 8})
    return results


def table(results: list[dict], args: Any) -> str:
    rows = [r for r in results if "step_ms" in r]
    base = next(r for r in rows if r["engine"] == "base model")
    lines = [
        f"| engine | CUDA graph | distinct adapters (rank {args.rank}) | ms/step | tokens/s "
        "| vs base |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = base["step_ms"] / r["step_ms"]
        flag = "" if r["pure_decode"] else " (not pure decode)"
        flag += f" rounds {r['rounds_ms']}" if "rounds_ms" in r else ""
        lines.append(
            f"| {r['engine']} | {'on' if r['graphs'] else 'off'} | {r['adapters']} "
            f"| {r['step_ms']:.2f} | {r['tok_s']:,.0f} | {ratio:.0%}{flag} |"
        )
    at8 = {r["engine"]: base["step_ms"] / r["step_ms"]
           for r in rows if r["adapters"] == 8 and r["graphs"]}  # fmt: skip
    lines.append(
        f"\n8 distinct adapters at batch {args.batch}, share of the base model's tokens/s "
        "(target 80%): " + ", ".join(f"{k} {v:.0%}" for k, v in at8.items())
    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("lora_bench needs a CUDA GPU (or --smoke)")
    out_dir = Path(os.environ.get("OUT") or "/tmp")
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    root = Path(args.root)
    model_dir = rc.write_checkpoint(args.spec, root / args.spec.name, args.device)
    adapters = write_adapters(
        args.spec, root / f"lora-{args.spec.name}", 32, args.rank, args.device
    )
    say(f"checkpoint and 32 adapters ready: {model_dir}")
    results = run_checks(model_dir, adapters, args, say) if args.device == "cuda" else []
    results += run_decode(model_dir, adapters, args, say)
    md = table(results, args)
    (out_dir / "lora_bench.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "lora_bench.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
