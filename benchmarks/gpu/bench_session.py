"""A run of run_gpu_bench.py: its `Plan` (shapes and sizes: `FULL` on a GPU, `SMOKE` on the CPU)
and the `Bench` its sections share (the report, checkpoints, ceilings, the one live engine and
compiled peer)."""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import random_checkpoint as rc
import torch
from attention_bench import KernelPlan
from report import Report

SECTIONS = ("ceilings", "b1", "batch", "offline", "hf", "kv", "b1_8b", "nano", "serve", "hf_static",
            "kernels")  # fmt: skip


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
