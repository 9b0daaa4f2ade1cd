"""The serving comparison on one machine: a mixed worker against prefill + decode workers, each
started as a real process tree (`pdserve.entrypoints.launch.Cluster`) and loaded by pdserve's own
`bench serve` client with the same random token-id prompts."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any


def serve_once(
    model_dir: Path,
    mode: str,
    *,
    device: str,
    vocab_size: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    max_concurrency: int,
    engine_overrides: dict[str, Any],
    start_timeout_s: float,
    run_timeout_s: float,
) -> dict[str, Any]:
    """Start a cluster (`mode` "mixed" or "pd"), run the load, stop it; the summary numbers."""
    from pdserve.bench.serve import ServeConfig, run_serve
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    overrides = {"device": device, "port": 0, **engine_overrides}
    if mode == "pd":  # one GPU: NCCL refuses two ranks on it, so the pages go over CUDA IPC
        overrides["kv_transfer"] = "cuda_ipc" if device == "cuda" else "tcp"
    topology = Topology.for_model(str(model_dir), mode=mode, **overrides)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    cluster = Cluster(topology, log_level="warning", start_timeout_s=start_timeout_s).start()
    start_s = time.perf_counter() - t0
    try:
        config = ServeConfig(
            base_url=cluster.url,
            tokenizer="none",  # random token ids below the real vocabulary: exact lengths
            vocab_size=vocab_size,
            input_len=input_len,
            output_len=output_len,
            num_prompts=num_prompts,
            max_concurrency=max_concurrency,
            num_warmups=2,
            disable_tqdm=True,
            timeout_s=run_timeout_s,
        )
        # A stuck cluster must not eat the rest of the benchmark's time.
        run = asyncio.run(asyncio.wait_for(run_serve(config), timeout=run_timeout_s))
    finally:
        cluster.stop(grace_s=2)
    s = run.summary
    return {
        "mode": mode,
        "kv_transfer": topology.kv_transfer.backend if mode == "pd" else None,
        "cluster_start_s": start_s,
        "completed": s.completed,
        "failed": s.failed,
        "errors": s.errors,
        "duration_s": s.duration_s,
        "output_tok_s": s.output_throughput,
        "mean_ttft_ms": s.ttft_ms.mean,
        "p99_ttft_ms": s.ttft_ms.p99,
        "mean_tpot_ms": s.tpot_ms.mean,
        "p99_tpot_ms": s.tpot_ms.p99,
        "mean_itl_ms": s.itl_ms.mean,
    }
