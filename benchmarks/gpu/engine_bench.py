"""pdserve's in-process engine under the benchmark's workloads, and the roofline each is held to.

Decode steps are timed by driving `engine.core` (a WorkerCore) directly: one `step()` is one forward
pass, so a step's time is known exactly, without prefill or result formatting mixed in.
"""

from __future__ import annotations

import gc
import random
import statistics
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from device_timer import wall
from random_checkpoint import ModelSpec, WeightCost

from pdserve.config.sampling_params import SamplingParams
from pdserve.scheduler.request import Request


@dataclass(frozen=True)
class Roofline:
    """The fastest a decode step could be: bytes over copy bandwidth, FLOPs over matmul rate."""

    spec: ModelSpec
    cost: WeightCost
    copy_bw: float  # bytes/s, read + written
    matmul_flops: float  # FLOP/s

    def step_bytes(self, contexts: list[int]) -> int:
        """Weights once, plus every request's KV cache."""
        return self.cost.decode_read_bytes + self.spec.kv_bytes_per_token * sum(contexts)

    def step_flops(self, contexts: list[int]) -> float:
        spec = self.spec
        attention = 4 * sum(contexts) * spec.num_heads * spec.head_dim * spec.num_layers
        return 2 * self.cost.matmul_params * len(contexts) + attention

    def step_seconds(self, contexts: list[int]) -> float:
        return max(
            self.step_bytes(contexts) / self.copy_bw, self.step_flops(contexts) / self.matmul_flops
        )


# ---------------------------------------------------------------------------- engine handling


def make_engine(model_dir: Path, device: str, dtype: str, backend: str, **options: Any) -> Any:
    """An in-process Engine. When CUDA graphs fail (no graph runner in this tree yet, or a capture
    error), one without them, so the other numbers still come; `engine.bench_note` says why."""
    from pdserve.entrypoints.engine import Engine

    common = {"in_process": True, "device": device, "dtype": dtype, "attention_backend": backend}
    if device == "cuda" and options.get("cuda_graph") is not False and not graphs_available():
        engine = Engine(str(model_dir), **common, **{**options, "cuda_graph": False})
        engine.bench_note = NO_GRAPH_RUNNER
        return engine
    try:
        engine = Engine(str(model_dir), **common, **options)
        engine.bench_note = None
        return engine
    except Exception as e:  # retried once below, without graphs; a second failure propagates
        if options.get("cuda_graph") is False or device != "cuda":
            raise
        note = f"cuda_graph=True failed ({type(e).__name__}: {str(e)[:200]}); ran without graphs"
    print(f"  {note}", flush=True)
    free_device_memory()
    engine = Engine(str(model_dir), **common, **{**options, "cuda_graph": False})
    engine.bench_note = note
    return engine


NO_GRAPH_RUNNER = "no pdserve.worker.cuda_graph_runner in this tree: ran with cuda_graph=False"


def graphs_available() -> bool:
    """Whether this tree has the CUDA graph runner that cuda_graph=True imports."""
    import importlib.util

    return importlib.util.find_spec("pdserve.worker.cuda_graph_runner") is not None


def engine_facts(engine: Any) -> dict[str, Any]:
    cfg = engine.config
    return {
        "cuda_graph": cfg.cuda_graph,
        "attention_backend": cfg.attention_backend,
        "num_pages": engine.core.runner.num_pages,
        "page_size": cfg.scheduler.page_size,
        "note": getattr(engine, "bench_note", None),
    }


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def new_request(prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, temperature=temperature)
    return Request(rid=uuid.uuid4().hex, prompt_ids=prompt_ids, sampling=params)


def random_prompts(rng: np.random.Generator, num: int, length: int, vocab: int) -> list[list[int]]:
    return rng.integers(0, vocab, size=(num, length)).tolist()


def step_until(core: Any, is_done: Any, max_steps: int = 100_000) -> None:
    """Step the core until `is_done()`; RuntimeError rather than spinning when it never is."""
    for _ in range(max_steps):
        if is_done():
            return
        if not core.has_work():
            raise RuntimeError("the engine went idle before the requests were done")
        core.step()
    raise RuntimeError(f"the requests were not done after {max_steps} steps")


def time_steps(core: Any, device: str, steps: int) -> tuple[float, list[int]]:
    """Seconds per step of `steps` steps run back to back, as a server runs them (the overlapped
    loop hides the host's share), with one wait at each end; and how many requests each step
    reported."""
    sizes = []
    start = wall(device)
    for _ in range(steps):
        sizes.append(len(core.step()))
    return (wall(device) - start) / steps, sizes


def finish_all(core: Any, reqs: list[Request]) -> None:
    """Abort what is left of `reqs` and step until the core is idle (pages back in the pool)."""
    for req in reqs:
        if not req.is_finished:
            core.abort(req.rid, "benchmark done")
    while core.has_work():
        core.step()


# ---------------------------------------------------------------------------- workloads


def decode_batch1(
    engine: Any, roof: Roofline, input_len: int, output_len: int, device: str, seed: int = 0
) -> dict[str, Any]:
    """One request, greedy: prefill time, then the mean time of its decode steps."""
    rng = np.random.default_rng(seed)
    core = engine.core
    vocab = roof.spec.vocab_size
    warm = new_request(random_prompts(rng, 1, input_len, vocab)[0], min(32, output_len))
    core.add(warm)
    _run_to_end(core, [warm])

    req = new_request(random_prompts(rng, 1, input_len, vocab)[0], output_len)
    core.add(req)
    t0 = wall(device)
    step_until(core, lambda: bool(req.output_ids))
    t1 = wall(device)
    first = len(req.output_ids)
    step_until(core, lambda: req.is_finished)
    t2 = wall(device)
    finish_all(core, [req])
    num_decode = len(req.output_ids) - first
    step_s = (t2 - t1) / max(num_decode, 1)
    context = input_len + first + num_decode / 2  # mean over the decode steps
    bytes_per_step = roof.step_bytes([int(context)])
    return {
        "model": roof.spec.name,
        "input_len": input_len,
        "output_tokens": len(req.output_ids),
        "prefill_ms": (t1 - t0) * 1e3,
        "decode_step_ms": step_s * 1e3,
        "decode_tok_s": 1.0 / step_s,
        "e2e_tok_s": len(req.output_ids) / (t2 - t0),
        "bytes_per_step": bytes_per_step,
        "roofline_tok_s": 1.0 / roof.step_seconds([int(context)]),
        "mbu": bytes_per_step / step_s / roof.copy_bw,
    }


def _run_to_end(core: Any, reqs: list[Request]) -> None:
    step_until(core, lambda: all(r.is_finished for r in reqs))
    finish_all(core, reqs)


_STEPS_PER_ROUND = 5  # decode_large_batch: the median of rounds of back-to-back steps


def decode_large_batch(
    engine: Any,
    roof: Roofline,
    batch: int,
    context_len: int,
    device: str,
    warmup_steps: int = 3,
    timed_steps: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill `batch` prompts of `context_len` tokens, then time pure decode steps back to back
    (`time_steps`: a wait per step would undo the overlapped loop), in rounds of a few steps."""
    rng = np.random.default_rng(seed + batch)
    core = engine.core
    # Long enough that no request finishes before the timed steps: the first admitted ones
    # decode while the rest prefill (at least 512 prompt tokens a step).
    max_new = batch * context_len // 512 + warmup_steps + timed_steps + 16
    prompts = random_prompts(rng, batch, context_len, roof.spec.vocab_size)
    reqs = [new_request(p, max_new) for p in prompts]
    for req in reqs:
        core.add(req)
    t0 = wall(device)
    step_until(core, lambda: all(r.output_ids for r in reqs))
    prefill_s = wall(device) - t0
    for _ in range(warmup_steps):
        core.step()
    times, sizes = [], []
    contexts = [r.seq_len for r in reqs]
    rounds = max(1, timed_steps // _STEPS_PER_ROUND)
    for _ in range(rounds):
        seconds, round_sizes = time_steps(core, device, timed_steps // rounds)
        times.append(seconds)
        sizes += round_sizes
    finish_all(core, reqs)
    step_s = statistics.median(times)
    roof_s = roof.step_seconds(contexts)
    return {
        "model": roof.spec.name,
        "batch": batch,
        "mean_context": sum(contexts) / len(contexts),
        "is_pure_decode": all(n == batch for n in sizes),
        "prefill_s": prefill_s,
        "step_ms": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "roofline_ms": roof_s * 1e3,
        "roofline_bytes_ms": roof.step_bytes(contexts) / roof.copy_bw * 1e3,
        "roofline_flops_ms": roof.step_flops(contexts) / roof.matmul_flops * 1e3,
        "ratio_to_roofline": step_s / roof_s,
        "decode_tok_s": batch / step_s,
    }


def offline_throughput(
    engine: Any,
    vocab: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """`engine.generate` over random token-id prompts, every one generating exactly
    `output_len` tokens greedily; a short batch first warms the engine up."""
    rng = np.random.default_rng(seed)
    warm = random_prompts(rng, 8, input_len, vocab)
    engine.generate(
        input_ids=warm, sampling_params={"max_new_tokens": 8, "ignore_eos": True, "temperature": 0}
    )
    prompts = random_prompts(rng, num_prompts, input_len, vocab)
    sampling = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    t0 = wall(device)
    outputs = engine.generate(input_ids=prompts, sampling_params=sampling)
    seconds = wall(device) - t0
    num_output = sum(len(o["output_ids"]) for o in outputs)
    return {
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "seconds": seconds,
        "output_tokens": num_output,
        "output_tok_s": num_output / seconds,
        "total_tok_s": (num_output + num_prompts * input_len) / seconds,
    }


def nano_vllm_workload(num_seqs: int, min_len: int, max_len: int) -> tuple[list, list[int]]:
    """nano-vllm's bench.py, draw for draw: Python's random, seed 0, ids in [0, 10000]."""
    rnd = random.Random(0)
    prompts = [
        [rnd.randint(0, 10000) for _ in range(rnd.randint(min_len, max_len))]
        for _ in range(num_seqs)
    ]
    max_tokens = [rnd.randint(min_len, max_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def nano_vllm_throughput(
    engine: Any, num_seqs: int, min_len: int, max_len: int, vocab: int, device: str
) -> dict[str, Any]:
    """Total output tokens / time, sampling at temperature 0.6 with ignore_eos, as nano-vllm."""
    prompts, max_tokens = nano_vllm_workload(num_seqs, min_len, max_len)
    prompts = [[t % vocab for t in p] for p in prompts]  # a no-op at real vocabularies
    engine.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 16})  # warm-up
    sampling = [{"max_new_tokens": n, "ignore_eos": True, "temperature": 0.6} for n in max_tokens]
    t0 = wall(device)
    outputs = engine.generate(input_ids=prompts, sampling_params=sampling)
    seconds = wall(device) - t0
    generated = sum(len(o["output_ids"]) for o in outputs)
    return {
        "num_seqs": num_seqs,
        "total_tokens": sum(max_tokens),
        "generated_tokens": generated,
        "seconds": seconds,
        "output_tok_s": sum(max_tokens) / seconds,
    }
