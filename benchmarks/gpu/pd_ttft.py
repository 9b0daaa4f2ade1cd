"""The TTFT that disaggregation adds (issue 17): the same 1,024-token prompts through a mixed worker
and through prefill + decode workers on the same GPU (KV over cuda_ipc), at the same loads, with
Llama-3.2-1B's shape (random bf16 weights, nothing downloaded).

For each mode one cluster is started; `pdserve bench serve`'s client then sends --num-prompts
prompts of --input-len random token ids (--output-len tokens each, streamed) at each concurrency
of --concurrencies (1: one request at a time, the latency the extra hops add by themselves;
higher: under load). Printed: TTFT mean / p50 / p90 of both modes and the difference of the
means and medians (pd - mixed). Target: at most 5 ms added.

    python benchmarks/gpu/pd_ttft.py                      # the GPU run
    python benchmarks/gpu/pd_ttft.py --concurrencies 1,16 --num-prompts 64
    python benchmarks/gpu/pd_ttft.py --smoke              # tiny shapes on the CPU (the test)

The JSON (--out-json; default $OUT/pd_ttft.json, else /tmp/pdserve-pd-ttft.json) is rewritten
after every load, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in logs

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from stream_bench import (  # noqa: E402  (sets PYTHONPATH for the children)
    GPU_MODEL,
    SMOKE_MODEL,
    cluster_parser,
    prepare_run,
    say,
    serve_load,
    start_cluster,
)

TARGET_MS = 5.0
GPU = {
    **GPU_MODEL,
    "num_prompts": 48, "input_len": 1024, "output_len": 16, "concurrencies": "1,16",
    "engine": {"num_pages": 8192, "max_running_requests": 64, "cuda_graph_max_batch": 64},
    "run_timeout_s": 120.0, "start_timeout_s": 240.0,
}  # fmt: skip
SMOKE = {
    **SMOKE_MODEL,
    "num_prompts": 4, "input_len": 24, "output_len": 3, "concurrencies": "1,2",
    "engine": {"num_pages": 256, "page_size": 4, "max_running_requests": 8},
    "run_timeout_s": 120.0, "start_timeout_s": 180.0,
}  # fmt: skip


def run_mode(model_dir: Path, mode: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Start one cluster, send each concurrency's load, stop it: TTFT figures per concurrency."""
    cluster, start_s = start_cluster(model_dir, mode, plan)
    out: dict[str, Any] = {"mode": mode, "cluster_start_s": start_s, "loads": {}}
    try:
        for key, concurrency in load_keys(plan["concurrencies"]):
            s = serve_load(
                cluster, plan, num_prompts=plan["num_prompts"], max_concurrency=concurrency,
                num_warmups=2, seed=concurrency,  # the same prompts in both modes
            )  # fmt: skip
            out["loads"][key] = {
                "completed": s.completed, "failed": s.failed, "errors": s.errors,
                "mean_ttft_ms": s.ttft_ms.mean, "p50_ttft_ms": s.ttft_ms.median,
                "p90_ttft_ms": s.ttft_ms.p90, "mean_tpot_ms": s.tpot_ms.mean,
            }  # fmt: skip
    finally:
        cluster.stop(grace_s=2)
    return out


def load_keys(concurrencies: str) -> list[tuple[str, int]]:
    """(key, concurrency) per load: a concurrency given again is a second load on the warm
    cluster, keyed "16 (2)" (a first load's compiles or captures show as the difference)."""
    seen: dict[int, int] = {}
    keys = []
    for c in [int(c) for c in str(concurrencies).split(",")]:
        seen[c] = seen.get(c, 0) + 1
        keys.append((str(c) if seen[c] == 1 else f"{c} ({seen[c]})", c))
    return keys


def added_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency both modes measured: the TTFT disaggregation adds (pd - mixed)."""
    rows = []
    if "mixed" not in runs or "pd" not in runs:
        return rows
    for key, mixed in runs["mixed"]["loads"].items():
        pd = runs["pd"]["loads"].get(key)
        if pd is None or mixed["completed"] == 0 or pd["completed"] == 0:
            continue
        rows.append({
            "concurrency": key,
            "mixed": mixed, "pd": pd,
            "added_mean_ms": pd["mean_ttft_ms"] - mixed["mean_ttft_ms"],
            "added_p50_ms": pd["p50_ttft_ms"] - mixed["p50_ttft_ms"],
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], input_len: int) -> list[str]:
    lines = [
        f"| concurrency | mixed TTFT mean / p50 / p90 ms | prefill + decode TTFT mean / p50 / p90 ms "
        f"| added mean / p50 ms ({input_len}-token prompts) | target <= {TARGET_MS:g} ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m, p = r["mixed"], r["pd"]
        worst = max(r["added_mean_ms"], r["added_p50_ms"])
        lines.append(
            f"| {r['concurrency']} | {m['mean_ttft_ms']:.2f} / {m['p50_ttft_ms']:.2f} / "
            f"{m['p90_ttft_ms']:.2f} | {p['mean_ttft_ms']:.2f} / {p['p50_ttft_ms']:.2f} / "
            f"{p['p90_ttft_ms']:.2f} | {r['added_mean_ms']:+.2f} / {r['added_p50_ms']:+.2f} "
            f"| {'met' if worst <= TARGET_MS else 'missed'} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cluster_parser(__doc__, ("num_prompts", "input_len", "output_len"))
    p.add_argument(
        "--concurrencies", default=None,
        help="comma-separated (default 1,16); one given twice is loaded twice (warm the 2nd time)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = ("num_prompts", "input_len", "output_len", "concurrencies")
    prepared = prepare_run(args, argv, (GPU, SMOKE), keys, "benchmarks/gpu/pd_ttft.py")
    if prepared is None:
        return 2
    plan, out_json, model_dir, report = prepared
    report["runs"] = {}
    for mode in args.modes.split(","):
        say(f"{mode}: starting")
        try:
            report["runs"][mode] = run_mode(model_dir, mode, plan)
        except Exception as e:  # one mode failing still leaves the other's numbers
            traceback.print_exc()
            report["errors"].append(f"{mode}: {type(e).__name__}: {e}")
            continue
        for key, load in report["runs"][mode]["loads"].items():
            say(f"{mode}, concurrency {key}: TTFT mean {load['mean_ttft_ms']:.2f} ms, "
                f"p50 {load['p50_ttft_ms']:.2f}, p90 {load['p90_ttft_ms']:.2f}; TPOT "
                f"{load['mean_tpot_ms']:.2f} ms; {load['completed']} done / {load['failed']} "
                "failed")  # fmt: skip
        out_json.write_text(json.dumps(report, indent=2, default=str))
    report["added"] = added_rows(report["runs"])
    out_json.write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(table(report["added"], plan["input_len"])))
    failed = sum(load["failed"] for r in report["runs"].values() for load in r["loads"].values())
    return 1 if report["errors"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
