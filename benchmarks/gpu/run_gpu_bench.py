"""pdserve's GPU speed in one call: ceilings, batch-1 MBU, large-batch decode steps against the
roofline, offline throughput against transformers, nano-vllm's workload, mixed vs prefill + decode
serving, KV transfer bandwidth, and paged attention kernels beside FlashInfer's. Every decode row
also times a compiled plain-torch decoder (torch_peer.py) on the same weights in the same call.
Random bf16 weights at real shapes, nothing downloaded.

    python benchmarks/gpu/run_gpu_bench.py                  # everything, about 8 minutes on an H100
    python benchmarks/gpu/run_gpu_bench.py --sections b1,batch
    python benchmarks/gpu/run_gpu_bench.py --smoke          # tiny shapes on the CPU (the test)

Each section is guarded: an error is printed and recorded, and the next section runs. The table and
the raw JSON are rewritten after every section (README.md beside this file explains the numbers).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in logs

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _path in (str(HERE), str(REPO)):  # the helper modules beside this file, and pdserve
    if _path not in sys.path:
        sys.path.insert(0, _path)
# Child processes (cluster workers, the HF and KV helpers) import pdserve from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import random_checkpoint as rc  # noqa: E402
import torch  # noqa: E402
from attention_bench import KernelPlan  # noqa: E402
from report import Report, size_text  # noqa: E402

SECTIONS = ("ceilings", "b1", "batch", "offline", "hf", "kv", "b1_8b", "nano", "serve", "hf_static",
            "kernels")  # fmt: skip
# Seconds a section needs at least on the H100 (engine start included): skipped with less left.
MIN_SECONDS = {"ceilings": 5, "b1": 45, "batch": 30, "offline": 40, "hf": 40, "kv": 10,
               "b1_8b": 60, "nano": 50, "serve": 90, "hf_static": 60, "kernels": 30}  # fmt: skip
# The engine each section drives (one lives at a time; sections without one free the GPU).
ENGINE_OF = {"b1": "1b", "batch": "1b", "offline": "1b", "b1_8b": "8b", "nano": "qwen"}
# The compiled plain-torch peer each section times beside pdserve (same checkpoint).
PEER_OF = {"b1": "1b", "batch": "1b", "offline": "1b", "b1_8b": "8b"}


@dataclass(frozen=True)
class Plan:
    """Shapes and sizes of one run: `FULL` on a GPU, `SMOKE` on the CPU in seconds."""

    device: str
    dtype: str
    models: dict[str, rc.ModelSpec]
    engine_options: dict[str, dict[str, Any]]
    copy_bytes: int
    matmul_n: int
    b1_lens: tuple[int, int]  # input, output
    batch_sizes: tuple[int, ...]
    batch_context: int
    batch_steps: int
    offline: tuple[int, int, int]  # prompts, input, output
    offline_cap_s: float
    hf_batch: int
    hf_timeout_s: float
    hf_static_cap_s: float
    nano: tuple[int, int, int]  # sequences, min length, max length
    serve: tuple[int, int, int, int]  # prompts, input, output, concurrency
    serve_options: dict[str, Any]
    kv_backend: str
    kv_layout_model: str
    kv_page_size: int
    kv_sizes: tuple[int, ...]  # bytes
    peer_offline_batch: int  # the compiled peer's one wave of the offline prompts
    kernels: KernelPlan
    default_sections: tuple[str, ...] = SECTIONS
    budget_s: float = 450.0
    shard_bytes: int = 4 << 30
    checkpoint_roots: tuple[str, ...] = ("/dev/shm/pdserve-bench", "/tmp/pdserve-bench")


FULL = Plan(
    device="cuda", dtype="bfloat16",
    models={"1b": rc.LLAMA_1B, "8b": rc.LLAMA_8B, "qwen": rc.QWEN3_06B},
    engine_options={
        "1b": {"num_pages": 20000, "max_running_requests": 256, "cuda_graph_max_batch": 256},
        "8b": {"num_pages": 1024, "max_running_requests": 16, "cuda_graph_max_batch": 16},
        "qwen": {"mem_fraction": 0.7, "max_running_requests": 256},
    },
    copy_bytes=1 << 30, matmul_n=8192, b1_lens=(128, 256), batch_sizes=(64, 256),
    batch_context=1024, batch_steps=30, offline=(1000, 512, 256), offline_cap_s=120.0,
    hf_batch=128, hf_timeout_s=150.0, hf_static_cap_s=240.0, nano=(256, 100, 1024),
    serve=(200, 512, 128, 32),
    serve_options={"num_pages": 4096, "max_running_requests": 64, "cuda_graph_max_batch": 64},
    kv_backend="cuda_ipc", kv_layout_model="1b", kv_page_size=16,
    kv_sizes=(4 << 20, 16 << 20, 64 << 20, 256 << 20), peer_offline_batch=256,
    kernels=KernelPlan(
        device="cuda", dtype=torch.bfloat16,
        shapes=((1, 1024), (64, 1024), (256, 1024), (64, 4096)), head_dims=(64, 128),
        tolerance=1e-2, max_checked_seqs={"decode": 16, "prefill": 2},
    ),
)  # fmt: skip
SMOKE = Plan(
    device="cpu", dtype="float32",
    models={"1b": rc.SMOKE_1B, "8b": rc.SMOKE_8B, "qwen": rc.SMOKE_QWEN},
    engine_options={k: {"num_pages": 256, "max_running_requests": 8} for k in ("1b", "8b", "qwen")},
    copy_bytes=1 << 22, matmul_n=128, b1_lens=(8, 12), batch_sizes=(2, 4), batch_context=32,
    batch_steps=3, offline=(12, 16, 8), offline_cap_s=60.0, hf_batch=4, hf_timeout_s=120.0,
    hf_static_cap_s=60.0, nano=(6, 10, 30), serve=(6, 16, 8, 3),
    serve_options={"num_pages": 256, "page_size": 4}, kv_backend="tcp", kv_layout_model="1b",
    kv_page_size=4, kv_sizes=(4 << 10, 16 << 10), budget_s=600.0, shard_bytes=100_000,
    checkpoint_roots=("/tmp/pdserve-bench-smoke",), peer_offline_batch=4,
    kernels=KernelPlan(
        device="cpu", dtype=torch.float32, shapes=((1, 24), (3, 40)), head_dims=(16, 32),
        tolerance=1e-4, max_checked_seqs={"decode": 16, "prefill": 2},
    ),
    # The kernels section is opt-in on the CPU (--sections kernels): torch references only.
    default_sections=tuple(s for s in SECTIONS if s != "kernels"),
)  # fmt: skip


@dataclass
class Bench:
    """What the sections share: the plan, the report, checkpoints, ceilings, the one live engine."""

    plan: Plan
    args: argparse.Namespace
    report: Report
    started: float = field(default_factory=time.perf_counter)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    ceilings: dict[str, Any] | None = None
    engine_key: str | None = None
    engine: Any = None
    peer_key: str | None = None
    peer: Any = None

    def remaining_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {msg}", flush=True)

    def checkpoint(self, key: str) -> Path:
        if key not in self.checkpoints:
            spec = self.plan.models[key]
            out = self._checkpoint_root(spec) / spec.name
            t0 = time.perf_counter()
            rc.write_checkpoint(spec, out, self.plan.device, self.plan.shard_bytes)
            self.say(f"checkpoint {spec.name} ready in {out} ({time.perf_counter() - t0:.1f} s)")
            self.checkpoints[key] = out
        return self.checkpoints[key]

    def _checkpoint_root(self, spec: rc.ModelSpec) -> Path:
        roots = (
            [self.args.model_dir_root] if self.args.model_dir_root else self.plan.checkpoint_roots
        )
        need = rc.checkpoint_bytes(spec) * 1.1 + (1 << 30)
        for root in roots:
            try:
                Path(root).mkdir(parents=True, exist_ok=True)
                if (Path(root) / spec.name / "bench_checkpoint.json").is_file():
                    return Path(root)
                if shutil.disk_usage(root).free >= need:
                    return Path(root)
            except OSError as e:  # not writable here: try the next root
                self.say(f"cannot use {root} for checkpoints: {e}")
        return Path(roots[-1])

    def measure_ceilings(self) -> dict[str, Any]:
        if self.ceilings is None:
            from device_timer import copy_bandwidth, matmul_rate

            dev, n = self.plan.device, self.plan.matmul_n
            copy = copy_bandwidth(dev, self.plan.copy_bytes)
            flops = matmul_rate(dev, n, torch.bfloat16 if dev == "cuda" else torch.float32)
            self.ceilings = {
                "matmul_dtype": "bfloat16" if dev == "cuda" else "float32",
                "copy_bytes": self.plan.copy_bytes,
                "copy_gb_s": copy / 1e9,
                "matmul_n": n,
                "matmul_tflops": flops / 1e12,
            }
        return self.ceilings

    def roofline(self, key: str) -> Any:
        from engine_bench import Roofline

        c = self.measure_ceilings()
        spec = self.plan.models[key]
        cost = rc.WeightCost.of(spec, rc.param_shapes(self.checkpoint(key)))
        return Roofline(spec, cost, c["copy_gb_s"] * 1e9, c["matmul_tflops"] * 1e12)

    def use_engine(self, key: str | None) -> Any:
        """The engine for checkpoint `key` (built once, reused); None frees the GPU."""
        from engine_bench import engine_facts, free_device_memory, make_engine

        if self.engine_key != key and self.engine is not None:
            self.engine.shutdown()
            self.engine, self.engine_key = None, None
        if self.engine is None:  # also what a failed section's engine left in torch's cache
            free_device_memory()
        if key is not None and self.engine is None:
            t0 = time.perf_counter()
            options = {**self.plan.engine_options[key], **self._engine_flags()}
            path = self.checkpoint(key)
            self.engine = make_engine(path, self.plan.device, self.plan.dtype, **options)
            self.engine_key = key
            facts = engine_facts(self.engine)
            self.say(f"engine {key} up in {time.perf_counter() - t0:.1f} s: {facts}")
        return self.engine

    def use_peer(self, key: str | None) -> Any:
        """The compiled plain-torch peer for checkpoint `key` (built once); None frees it."""
        from engine_bench import free_device_memory

        if self.peer_key != key and self.peer is not None:
            self.peer, self.peer_key = None, None
            torch._dynamo.reset()  # its compiled code and CUDA graphs go with it
            free_device_memory()
        if key is not None and self.peer is None:
            from torch_peer import TorchPeer

            t0 = time.perf_counter()
            is_cuda = self.plan.device == "cuda"
            if is_cuda:  # say in the log why inductor would skip CUDA graphs, if it does
                torch._logging.set_logs(perf_hints=True)
            dtype = getattr(torch, self.plan.dtype)
            self.peer = TorchPeer(self.checkpoint(key), self.plan.device, dtype, compile=is_cuda)
            self.peer_key = key
            self.say(f"peer {key} loaded in {time.perf_counter() - t0:.1f} s (compile: {is_cuda})")
        return self.peer

    def _engine_flags(self) -> dict[str, Any]:
        flags: dict[str, Any] = {"backend": self.args.attention_backend}
        if not self.args.cuda_graph:
            flags["cuda_graph"] = False
        return flags


# ---------------------------------------------------------------------------- the sections


def sec_ceilings(b: Bench) -> dict[str, Any]:
    c = b.measure_ceilings()
    b.say(f"copy {c['copy_gb_s']:.0f} GB/s, matmul {c['matmul_tflops']:.1f} TFLOP/s")
    return c


def _with_peer(b: Bench, key: str, label: str, fn: Callable[[Any], dict]) -> dict[str, Any]:
    """{"peer": fn(peer)} for the peer of checkpoint `key`; its error is recorded beside pdserve's
    numbers (never the section's), and the peer is rebuilt for the next row."""
    if not b.args.peer:
        return {}
    try:
        r = fn(b.use_peer(key))
    except Exception as e:  # pdserve's numbers of the row still count
        traceback.print_exc()
        b.say(f"peer error ({label}): {type(e).__name__}: {str(e)[:300]}")
        b.use_peer(None)
        return {"peer_error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"peer": r}


def _peer_b1(b: Bench, peer: Any, engine: Any, roof: Any, pd_ms: float) -> dict[str, Any]:
    from peer_bench import check_against_engine, peer_batch1

    input_len, output_len = b.plan.b1_lens
    peer.ensure_cache(1, input_len + output_len)  # one cache shape: one compile for both
    check = check_against_engine(engine, peer, roof.spec.vocab_size)
    b.say(f"peer check: {check_text(check)}")
    r = peer_batch1(peer, roof, input_len, output_len)
    b.say(
        f"peer batch 1: {r['decode_step_ms']:.2f} ms/step, MBU {r['mbu']:.0%}; pdserve / peer "
        f"speed {r['decode_step_ms'] / pd_ms:.2f}x (CUDA graph skips: {r['cudagraph_skips']})"
    )
    return {**r, "check": check}


def check_text(c: dict[str, Any]) -> str:
    gap = c["fp32_gap_at_divergence"]
    tie = (
        ""
        if gap is None
        else f" (float32 gap there {gap:+.3f}, bf16 abs err {c['logits_abs_err']:.3f})"
    )
    return (
        f"greedy tokens equal pdserve's for {c['equal_prefix']}/{c['num_new']}{tie}; logits vs "
        f"float32 max rel err {c['logits_max_rel_err']:.1e} (tol {c['logits_tolerance']:.0e}); "
        f"argmax = float32's for {c['peer_argmax_vs_fp32']:.0%} of the peer's tokens, "
        f"{c['pdserve_argmax_vs_fp32']:.0%} of pdserve's: {'PASS' if c['passed'] else 'FAIL'}"
    )


def _sec_b1(b: Bench, key: str) -> dict[str, Any]:
    from engine_bench import decode_batch1

    engine, roof = b.use_engine(key), b.roofline(key)
    input_len, output_len = b.plan.b1_lens
    r = decode_batch1(engine, roof, input_len, output_len, b.plan.device)
    b.say(
        f"{key} batch 1: {r['decode_tok_s']:.0f} tok/s ({r['decode_step_ms']:.2f} ms/step), "
        f"MBU {r['mbu']:.0%}, prefill {r['prefill_ms']:.1f} ms"
    )
    pd_ms = r["decode_step_ms"]
    r.update(_with_peer(b, key, f"{key} b1", lambda p: _peer_b1(b, p, engine, roof, pd_ms)))
    return r


def sec_batch(b: Bench) -> dict[str, Any]:
    from engine_bench import decode_large_batch
    from peer_bench import peer_large_batch

    engine, roof = b.use_engine("1b"), b.roofline("1b")
    rows = []
    for batch in b.plan.batch_sizes:
        r = decode_large_batch(
            engine, roof, batch, b.plan.batch_context, b.plan.device, timed_steps=b.plan.batch_steps
        )
        b.say(
            f"batch {batch}: {r['step_ms']:.2f} ms/step vs roofline {r['roofline_ms']:.2f} ms "
            f"({r['ratio_to_roofline']:.2f}x), pure decode: {r['is_pure_decode']}"
        )
        timed = functools.partial(
            peer_large_batch, roof=roof, batch=batch, context_len=round(r["mean_context"]),
            timed_steps=b.plan.batch_steps,
        )  # fmt: skip
        r.update(_with_peer(b, "1b", f"batch {batch}", timed))
        if "peer" in r:
            p = r["peer"]
            b.say(f"peer batch {batch}: {p['step_ms']:.2f} ms/step ({p['ratio_to_roofline']:.2f}x "
                  f"roofline); pdserve / peer speed {p['step_ms'] / r['step_ms']:.2f}x")  # fmt: skip
        rows.append(r)
    return {"batches": rows}


def sec_offline(b: Bench) -> dict[str, Any]:
    from engine_bench import offline_throughput
    from peer_bench import peer_offline

    num, input_len, output_len = b.plan.offline
    num = _offline_prompts_within_cap(b, num, input_len, output_len)
    engine = b.use_engine("1b")
    vocab = b.plan.models["1b"].vocab_size
    r = offline_throughput(engine, vocab, num, input_len, output_len, b.plan.device)
    b.say(f"offline: {r['output_tok_s']:.0f} output tok/s over {r['seconds']:.1f} s")
    wave = functools.partial(
        peer_offline, vocab=vocab, batch=b.plan.peer_offline_batch, input_len=input_len,
        output_len=output_len,
    )  # fmt: skip
    r.update(_with_peer(b, "1b", "offline", wave))
    if "peer" in r:
        p = r["peer"]
        b.say(f"peer offline (one wave of {p['batch']}): {p['output_tok_s']:.0f} output tok/s; "
              f"pdserve / peer {r['output_tok_s'] / p['output_tok_s']:.2f}x")  # fmt: skip
    return {"model": b.plan.models["1b"].name, **r}


def _offline_prompts_within_cap(b: Bench, num: int, input_len: int, output_len: int) -> int:
    """Fewer prompts (a multiple of the batch) when the batch-256 step time says `num` would
    overrun the cap: a rate needs a full batch, not every prompt."""
    batches = (b.report.sections.get("batch") or {}).get("batches", [])
    step_ms = next((r["step_ms"] for r in batches if r["batch"] == 256), None)
    if step_ms is None:
        return num
    waves = -(-num // 256)
    estimate_s = waves * output_len * step_ms * 1.5 / 1e3 + num * input_len / 20000
    cap = min(b.plan.offline_cap_s, max(b.remaining_s() - 60, 30))
    if estimate_s <= cap:
        return num
    reduced = max(256, int(num * cap / estimate_s) // 256 * 256)
    b.say(f"offline: {num} prompts would take ~{estimate_s:.0f} s; running {reduced}")
    return min(num, reduced)


def _hf(b: Bench, mode: str, timeout_s: float) -> dict[str, Any]:
    from child_process import run_child

    _, input_len, output_len = b.plan.offline
    args = ["--model-dir", str(b.checkpoint("1b")), "--device", b.plan.device]
    args += ["--dtype", b.plan.dtype, "--mode", mode, "--batch", str(b.plan.hf_batch)]
    args += ["--input-len", str(input_len), "--output-len", str(output_len)]
    args += ["--num-batches", str(b.args.hf_batches)]
    r = run_child("hf_generate.py", args, timeout_s)
    b.say(f"HF {mode}: {r['output_tok_s']:.0f} output tok/s ({r['step_ms']:.1f} ms/step)")
    return r


def sec_hf(b: Bench) -> dict[str, Any]:
    return _hf(b, "eager", min(b.plan.hf_timeout_s, max(b.remaining_s(), 30)))


def sec_hf_static(b: Bench) -> dict[str, Any]:
    if b.plan.device != "cuda":
        raise _Skip("transformers compiles generate only on CUDA")
    return _hf(b, "static", min(b.plan.hf_static_cap_s, b.remaining_s() - 5))


def sec_nano(b: Bench) -> dict[str, Any]:
    from engine_bench import nano_vllm_throughput

    engine = b.use_engine("qwen")
    num, low, high = b.plan.nano
    vocab = b.plan.models["qwen"].vocab_size
    r = nano_vllm_throughput(engine, num, low, high, vocab, b.plan.device)
    b.say(f"nano-vllm workload: {r['output_tok_s']:.0f} tok/s ({r['seconds']:.1f} s)")
    return {**r, "model": b.plan.models["qwen"].name}


def sec_serve(b: Bench) -> dict[str, Any]:
    from engine_bench import graphs_available
    from serve_bench import serve_once

    num, input_len, output_len, concurrency = b.plan.serve
    out: dict[str, Any] = {"model": b.plan.models["1b"].name, "num_prompts": num}
    out.update(input_len=input_len, output_len=output_len, max_concurrency=concurrency)
    flags = {"attention_backend": b.args.attention_backend}
    if not b.args.cuda_graph or (b.plan.device == "cuda" and not graphs_available()):
        flags["cuda_graph"] = False
    out["cuda_graph"] = flags.get("cuda_graph", True) and b.plan.device == "cuda"
    for mode in ("mixed", "pd"):
        try:
            r = serve_once(
                b.checkpoint("1b"), mode, device=b.plan.device,
                vocab_size=b.plan.models["1b"].vocab_size, num_prompts=num, input_len=input_len,
                output_len=output_len, max_concurrency=concurrency,
                engine_overrides={**b.plan.serve_options, **flags},
                start_timeout_s=max(60, min(240, b.remaining_s() / 2)),
                run_timeout_s=max(30, min(150, b.remaining_s() / 2)),
            )  # fmt: skip
        except Exception as e:  # one mode failing still leaves the other's numbers
            traceback.print_exc()
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"
            continue
        b.say(
            f"serve {mode}: {r['output_tok_s']:.0f} tok/s, TTFT {r['mean_ttft_ms']:.0f} ms, "
            f"TPOT {r['mean_tpot_ms']:.1f} ms, {r['failed']} failed "
            f"(cluster start {r['cluster_start_s']:.0f} s)"
        )
        out[mode] = r
    if "mixed" not in out and "pd" not in out:
        raise RuntimeError(f"both serving runs failed: {out}")
    return out


def sec_kv(b: Bench) -> dict[str, Any]:
    from kv_bench import PageLayout, measure_kv_transfer

    spec = b.plan.models[b.plan.kv_layout_model]
    dtype = torch.bfloat16 if b.plan.device == "cuda" else torch.float32
    layout = PageLayout(
        spec.num_layers, b.plan.kv_page_size, spec.num_kv_heads, spec.head_dim, dtype
    )
    copy_gb_s = b.measure_ceilings()["copy_gb_s"]
    work_dir = Path(tempfile.mkdtemp(prefix="pdserve-kv-bench-"))
    r = measure_kv_transfer(
        b.plan.kv_backend, b.plan.device, layout, list(b.plan.kv_sizes), copy_gb_s * 1e9, work_dir
    )
    for row in r["sizes"]:
        b.say(
            f"kv {size_text(row['size_bytes'])}: {row['payload_gb_s']:.1f} GB/s, "
            f"{row['ratio_to_copy']:.0%} of copy; checksum ok: {r['checksum_matches']}"
        )
    return {**r, "copy_gb_s": copy_gb_s}


def sec_kernels(b: Bench) -> dict[str, Any]:
    from attention_bench import run_kernels

    c = b.measure_ceilings()
    out = os.environ.get("OUT")
    log_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="pdserve-kernels-"))
    warm_s = max(30.0, b.remaining_s() - 60)  # FlashInfer's JIT builds; the timings need ~60 s
    return run_kernels(b.plan.kernels, c["copy_gb_s"], c["matmul_tflops"], b.say, log_dir, warm_s)


class _Skip(Exception):
    """A section that cannot run here (not an error)."""


SECTION_FUNCS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "ceilings": sec_ceilings,
    "b1": lambda b: _sec_b1(b, "1b"),
    "batch": sec_batch,
    "offline": sec_offline,
    "hf": sec_hf,
    "kv": sec_kv,
    "b1_8b": lambda b: _sec_b1(b, "8b"),
    "nano": sec_nano,
    "serve": sec_serve,
    "hf_static": sec_hf_static,
    "kernels": sec_kernels,
}


# ---------------------------------------------------------------------------- running


def run_section(b: Bench, name: str) -> None:
    if b.remaining_s() < MIN_SECONDS[name] and not b.args.smoke:
        b.report.skipped[name] = f"out of time budget ({b.remaining_s():.0f} s left)"
        b.say(f"skip {name}: {b.report.skipped[name]}")
        return
    b.say(f"== {name}")
    t0 = time.perf_counter()
    try:
        if b.peer_key != PEER_OF.get(name):
            b.use_peer(None)  # built again when a row needs it
        b.use_engine(ENGINE_OF.get(name))
        result = SECTION_FUNCS[name](b)
        if b.engine is not None:
            from engine_bench import engine_facts

            result["engine"] = engine_facts(b.engine)
        b.report.sections[name] = {**result, "section_s": time.perf_counter() - t0}
    except _Skip as e:
        b.report.skipped[name] = str(e)
        b.say(f"skip {name}: {e}")
    except Exception as e:  # a benchmark reports a broken section and goes on to the next
        traceback.print_exc()
        sys.stderr.flush()
        b.report.errors[name] = f"{type(e).__name__}: {e}"
        b.say(f"error in {name}: {type(e).__name__}: {str(e)[:300]}")
        try:
            b.use_engine(None)  # its state is unknown: the next section starts a fresh one
            b.use_peer(None)
        except Exception:  # freeing after a CUDA error can fail too; the next section will say
            traceback.print_exc()


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": plan.device,
    }
    if plan.device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = "CPU"
    env["weights"] = "smoke shapes (tiny)" if plan.device == "cpu" else "real shapes"
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    out = os.environ.get("OUT")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections", default=None, help=f"subset of {SECTIONS} (default: all; --smoke: all "
        "but kernels)"
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the CPU test)")
    p.add_argument(
        "--model-dir-root",
        default=None,
        help="where checkpoints are written "
        "(default: /dev/shm/pdserve-bench if it has room, else /tmp/pdserve-bench)",
    )
    p.add_argument(
        "--out-md",
        default=str(Path(out) / "BENCHMARKS.md") if out else str(REPO / "docs" / "BENCHMARKS.md"),
    )
    p.add_argument(
        "--out-json",
        default=str(Path(out) / "gpu_bench.json") if out else "/tmp/pdserve-gpu-bench.json",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="sections that would start past this many seconds are skipped",
    )
    p.add_argument(
        "--attention-backend", default="auto", choices=["auto", "torch", "triton", "flashinfer"]
    )
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hf-batches", type=int, default=1, help="timed transformers batches")
    p.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True,
        help="time the compiled plain-torch peer beside every decode row",
    )  # fmt: skip
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.sections is None:
        args.sections = ",".join(plan.default_sections)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}: expected some of {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.budget_s is None:
        args.budget_s = plan.budget_s
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU shapes", file=sys.stderr)
        return 2
    command = "python benchmarks/gpu/run_gpu_bench.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    b = Bench(plan, args, Report(command.strip(), environment(plan)))
    md_path, json_path = Path(args.out_md), Path(args.out_json)
    chosen = args.sections.split(",")
    for name in [s for s in SECTIONS if s in chosen]:
        run_section(b, name)
        b.report.write(md_path, json_path)
    try:
        b.use_engine(None)
        b.use_peer(None)
    except Exception:  # after a CUDA error even freeing can fail; the results are written
        traceback.print_exc()
    b.say(f"done; wrote {md_path} and {json_path}")
    print("\n" + b.report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
