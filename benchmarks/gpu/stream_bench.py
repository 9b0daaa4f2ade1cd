"""Smooth streams (issue 17): how each stream's tokens reach its client, under a steady load and
under an all-at-once burst, on one GPU with Llama-3.2-1B's shape (random bf16 weights, nothing
downloaded).

For each mode (a mixed worker; prefill + decode on the same GPU over cuda_ipc) and each value of
--prefill-budgets (the scheduler's decode_step_prefill_tokens), one cluster is started and loaded
twice by `pdserve bench serve`'s client, spread over --client-procs processes so that the client
never is what clumps tokens:
  steady  --steady-streams concurrent streams (64), --steady-prompts of them in all;
  burst   --num-prompts (1,000) sent at once;
each prompt --input-len (1,024) random token ids, --output-len (256) tokens streamed. Printed per
run: ITL p50/p90 and mean TPOT of both loads, the two target ratios, TTFT, the decode-side
worker's step time as its load reports gave it (TPOT far above it: the host pipeline limits), and
each server process's CPU time per output token (one near 1e6 / tokens-per-second is saturated).

    python benchmarks/gpu/stream_bench.py                       # the GPU run
    python benchmarks/gpu/stream_bench.py --modes mixed --prefill-budgets 512,1024,2048
    python benchmarks/gpu/stream_bench.py --smoke               # tiny shapes on the CPU (the test)

Targets: burst ITL p90 <= 2x its mean TPOT; burst mean TPOT <= 2x the steady one. The JSON
(--out-json; default $OUT/stream_bench.json, else /tmp/pdserve-stream-bench.json) is rewritten
after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in logs

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _path in (str(HERE), str(REPO)):  # random_checkpoint beside this file, and pdserve
    if _path not in sys.path:
        sys.path.insert(0, _path)
# Child processes (the cluster, the client processes) import pdserve from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import numpy as np  # noqa: E402
import random_checkpoint as rc  # noqa: E402

TARGET_RATIO = 2.0
# Where a cluster benchmark runs and on what model (the plans below, pd_ttft.py's too, add loads).
GPU_MODEL = {"spec": rc.LLAMA_1B, "device": "cuda",
             "roots": ("/dev/shm/pdserve-bench", "/tmp/pdserve-bench")}  # fmt: skip
SMOKE_MODEL = {"spec": rc.SMOKE_1B, "device": "cpu", "roots": ("/tmp/pdserve-bench-smoke",)}
GPU = {
    **GPU_MODEL,
    "num_prompts": 1000, "input_len": 1024, "output_len": 256, "steady_streams": 64,
    "steady_prompts": 192, "client_procs": 8, "tokenizer_replicas": 4, "prefill_budgets": "512",
    "engine": {"num_pages": 24000, "max_running_requests": 256, "cuda_graph_max_batch": 256},
    "run_timeout_s": 240.0, "start_timeout_s": 240.0,
}  # fmt: skip
SMOKE = {
    **SMOKE_MODEL,
    "num_prompts": 12, "input_len": 24, "output_len": 6, "steady_streams": 3,
    "steady_prompts": 6, "client_procs": 2, "tokenizer_replicas": 1, "prefill_budgets": "64",
    "engine": {"num_pages": 512, "page_size": 4, "max_running_requests": 16},
    "run_timeout_s": 120.0, "start_timeout_s": 180.0,
}  # fmt: skip


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- measuring


class StepSampler:
    """Samples the decode-side workers' `step_time_ms` from /server_info while they run."""

    def __init__(self, url: str, every_s: float = 0.25) -> None:
        self.url, self.every_s = url, every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StepSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.wait(self.every_s):
                try:
                    workers = client.get("/server_info").json()["workers"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                for w in workers:
                    if w["role"] != "prefill" and w.get("num_running_reqs"):
                        self.samples.append(float(w["step_time_ms"]))


def cpu_seconds(cluster: Any) -> dict[str, float]:
    """User + system CPU seconds of each local server process so far, by name."""
    out = {}
    for child in cluster.children:
        try:
            fields = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[child.name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def serve_load(cluster: Any, plan: dict[str, Any], **load: Any) -> Any:
    """One load of `pdserve bench serve`'s client on a running cluster, its prompts the plan's
    lengths of random token ids; `load`: ServeConfig's other fields (num_prompts, ...). Its
    summary (pdserve.bench.serve.ServeSummary)."""
    from pdserve.bench.serve import ServeConfig, run_serve

    config = ServeConfig(
        base_url=cluster.url,
        tokenizer="none",  # random token ids below the real vocabulary: exact lengths
        vocab_size=plan["spec"].vocab_size,
        input_len=plan["input_len"],
        output_len=plan["output_len"],
        disable_tqdm=True,
        timeout_s=plan["run_timeout_s"],
        **load,
    )
    return asyncio.run(asyncio.wait_for(run_serve(config), plan["run_timeout_s"])).summary


def run_load(cluster: Any, plan: dict[str, Any], burst: bool, seed: int) -> dict[str, Any]:
    """One load (steady or burst) on a running cluster: the numbers of the targets and why."""
    before = cpu_seconds(cluster)
    with StepSampler(cluster.url) as steps:
        s = serve_load(
            cluster, plan,
            num_prompts=plan["num_prompts"] if burst else plan["steady_prompts"],
            max_concurrency=None if burst else plan["steady_streams"],
            num_warmups=0 if burst else 2,
            seed=seed,
            num_client_procs=plan["client_procs"],
        )  # fmt: skip
    after = cpu_seconds(cluster)
    tokens = max(s.total_output_tokens, 1)
    cpu_us = {n: (after[n] - before[n]) / tokens * 1e6 for n in after if n in before}
    step_ms = steps.samples or [0.0]
    return {
        "completed": s.completed, "failed": s.failed, "errors": s.errors,
        "duration_s": s.duration_s, "output_tok_s": s.output_throughput,
        "mean_ttft_ms": s.ttft_ms.mean, "p90_ttft_ms": s.ttft_ms.p90,
        "mean_tpot_ms": s.tpot_ms.mean, "p90_tpot_ms": s.tpot_ms.p90,
        "mean_itl_ms": s.itl_ms.mean, "p50_itl_ms": s.itl_ms.median, "p90_itl_ms": s.itl_ms.p90,
        "p99_itl_ms": s.itl_ms.p99,
        "worker_step_ms_mean": float(np.mean(step_ms)),
        "worker_step_ms_p90": float(np.percentile(step_ms, 90)),
        "cpu_us_per_output_token": {n: round(v, 1) for n, v in sorted(cpu_us.items())},
    }  # fmt: skip


def start_cluster(
    model_dir: Path, mode: str, plan: dict[str, Any], **options: Any
) -> tuple[Any, float]:
    """A started cluster ("mixed", or "pd" on the one device: KV over CUDA IPC, tcp on the CPU)
    with the plan's engine options and `options`; and the seconds its start took."""
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    overrides: dict[str, Any] = {"device": plan["device"], "port": 0, **plan["engine"], **options}
    if mode == "pd":  # one GPU: NCCL refuses two ranks on it, so the pages go over CUDA IPC
        overrides["kv_transfer"] = "cuda_ipc" if plan["device"] == "cuda" else "tcp"
    topology = Topology.for_model(str(model_dir), mode=mode, **overrides)
    t0 = time.perf_counter()
    cluster = Cluster(topology, log_level="warning", start_timeout_s=plan["start_timeout_s"])
    cluster.start()
    return cluster, time.perf_counter() - t0


def run_cluster(model_dir: Path, mode: str, budget: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Start one cluster; the steady load, then the burst; stop it."""
    cluster, start_s = start_cluster(
        model_dir, mode, plan,
        decode_step_prefill_tokens=budget, tokenizer_replicas=plan["tokenizer_replicas"],
    )  # fmt: skip
    out: dict[str, Any] = {"mode": mode, "decode_step_prefill_tokens": budget}
    out["cluster_start_s"] = start_s
    try:
        out["steady"] = run_load(cluster, plan, burst=False, seed=1)
        out["burst"] = run_load(cluster, plan, burst=True, seed=2)
    finally:
        cluster.stop(grace_s=2)
    steady, burst = out["steady"], out["burst"]
    out["itl_p90_over_tpot"] = burst["p90_itl_ms"] / max(burst["mean_tpot_ms"], 1e-9)
    out["burst_over_steady_tpot"] = burst["mean_tpot_ms"] / max(steady["mean_tpot_ms"], 1e-9)
    return out


# ---------------------------------------------------------------------------- reporting


def summary_lines(r: dict[str, Any]) -> list[str]:
    s, b = r["steady"], r["burst"]

    def verdict(x: float) -> str:
        return "met" if x <= TARGET_RATIO else "MISSED"

    def cpu(load: dict[str, Any]) -> str:
        return ", ".join(f"{n} {v:.0f}" for n, v in load["cpu_us_per_output_token"].items())

    ratio_itl, ratio_tpot = r["itl_p90_over_tpot"], r["burst_over_steady_tpot"]
    return [
        f"{r['mode']}, decode_step_prefill_tokens={r['decode_step_prefill_tokens']}:",
        f"  burst : ITL p50 {b['p50_itl_ms']:.2f} ms, p90 {b['p90_itl_ms']:.2f} ms, "
        f"mean TPOT {b['mean_tpot_ms']:.2f} ms, TTFT {b['mean_ttft_ms']:.0f} ms, "
        f"{b['output_tok_s']:.0f} tok/s, worker step {b['worker_step_ms_mean']:.2f} ms "
        f"(p90 {b['worker_step_ms_p90']:.2f}), {b['completed']} done / {b['failed']} failed",
        f"  steady: ITL p50 {s['p50_itl_ms']:.2f} ms, p90 {s['p90_itl_ms']:.2f} ms, "
        f"mean TPOT {s['mean_tpot_ms']:.2f} ms, TTFT {s['mean_ttft_ms']:.0f} ms, "
        f"{s['output_tok_s']:.0f} tok/s, worker step {s['worker_step_ms_mean']:.2f} ms",
        f"  target ITL p90 / mean TPOT (burst) = {ratio_itl:.2f} (<= 2: {verdict(ratio_itl)}); "
        f"mean TPOT burst / steady = {ratio_tpot:.2f} (<= 2: {verdict(ratio_tpot)})",
        f"  CPU us per output token, burst: {cpu(b)}",
        f"  CPU us per output token, steady: {cpu(s)}",
    ]


def checkpoint_dir(plan: dict[str, Any], root_arg: str | None) -> Path:
    spec = plan["spec"]
    roots = [root_arg] if root_arg else list(plan["roots"])
    need = rc.checkpoint_bytes(spec) * 1.1 + (1 << 30)
    root = roots[-1]
    for candidate in roots:
        Path(candidate).mkdir(parents=True, exist_ok=True)
        if (Path(candidate) / spec.name).is_dir() or shutil.disk_usage(candidate).free >= need:
            root = candidate
            break
    shard_bytes = 4 << 30 if plan["device"] == "cuda" else 100_000
    return rc.write_checkpoint(spec, Path(root) / spec.name, plan["device"], shard_bytes)


def cluster_parser(doc: str | None, int_options: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options a cluster benchmark shares: --smoke, --modes, --model-dir-root, --out-json,
    and an int option per name of `int_options` (default None: the plan's)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the CPU test)")
    p.add_argument("--modes", default="mixed,pd", help="mixed, pd, or both (comma-separated)")
    for name in int_options:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--model-dir-root", default=None, help="where the random checkpoint goes")
    p.add_argument("--out-json", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cluster_parser(__doc__, ("num_prompts", "input_len", "output_len", "steady_streams",
                                 "steady_prompts", "client_procs", "tokenizer_replicas"))  # fmt: skip
    p.add_argument(
        "--prefill-budgets",
        default=None,
        help="decode_step_prefill_tokens values, comma-separated: a cluster each (default: the "
        "scheduler's default; smoke: 64)",
    )
    return p.parse_args(argv)


def prepare_run(
    args: argparse.Namespace,
    argv: list[str] | None,
    plans: tuple[dict[str, Any], dict[str, Any]],
    keys: tuple[str, ...],
    script: str,
) -> tuple[dict[str, Any], Path, Path, dict[str, Any]] | None:
    """A cluster benchmark's start: its plan (plans = (GPU, smoke), the `keys` given on the
    command line override it), the JSON's path ($OUT/<script>.json, else /tmp), the random
    checkpoint and the report's head; None (said on stderr) for a GPU plan without a GPU."""
    plan = dict(plans[1] if args.smoke else plans[0])
    for key in keys:
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if plan["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU shapes", file=sys.stderr)
            return None
    logging.basicConfig(level=logging.WARNING)
    out_dir = os.environ.get("OUT")
    name = Path(script).stem
    out_json = Path(args.out_json or (f"{out_dir}/{name}.json" if out_dir else
                                      f"/tmp/pdserve-{name.replace('_', '-')}.json"))  # fmt: skip
    model_dir = checkpoint_dir(plan, args.model_dir_root)
    say(f"checkpoint {model_dir}")
    report: dict[str, Any] = {
        "command": " ".join(["python", script, *(argv or sys.argv[1:])]),
        "plan": {k: v for k, v in plan.items() if k != "spec"} | {"model": plan["spec"].name},
        "errors": [],
    }  # fmt: skip
    return plan, out_json, model_dir, report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = ("num_prompts", "input_len", "output_len", "steady_streams", "steady_prompts",
            "client_procs", "tokenizer_replicas", "prefill_budgets")  # fmt: skip
    prepared = prepare_run(args, argv, (GPU, SMOKE), keys, "benchmarks/gpu/stream_bench.py")
    if prepared is None:
        return 2
    plan, out_json, model_dir, report = prepared
    report["runs"] = []
    budgets = [int(b) for b in str(plan["prefill_budgets"]).split(",")]
    for mode in args.modes.split(","):
        for budget in budgets:
            say(f"{mode}, decode_step_prefill_tokens={budget}: starting")
            try:
                result = run_cluster(model_dir, mode, budget, plan)
            except Exception as e:  # one run failing still leaves the others' numbers
                traceback.print_exc()
                report["errors"].append(f"{mode}/{budget}: {type(e).__name__}: {e}")
                continue
            report["runs"].append(result)
            for line in summary_lines(result):
                say(line)
            out_json.write_text(json.dumps(report, indent=2, default=str))
    out_json.write_text(json.dumps(report, indent=2, default=str))
    say(f"wrote {out_json}")
    return 0 if report["runs"] and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
