"""Saturation soak: a CPU prefill + decode cluster kept busy for minutes; every request must end,
every process's memory must stay flat, and every KV page must come back.

    python benchmarks/soak.py --minutes 10            # starts a tiny-model 1P1D cluster over tcp
    python benchmarks/soak.py --minutes 1 --concurrency 16

Load: `--concurrency` clients in a loop, each sending a mix of streamed and non-streamed chat,
completions and /generate requests with random lengths, some with a client timeout that cuts the
stream (a disconnect the server must clean up after). Memory: the resident set of each child
(from /proc) sampled every `--sample-s` seconds; "flat" compares the mean of the last quarter of
the run with the mean of the second quarter (the first is warm-up), and fails above `--max-growth`.
Prints a table and exits 1 on a hang, a 5xx, leftover in-flight requests, unreturned pages or growth.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port
from pdserve.tiny_model.build import build_tiny_model


def rss_mib(pid: int) -> float:
    """Resident set of a process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def body(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    words = " ".join(
        rng.choice(["keeper", "lamp", "sea", "stairs", "é東", "night"])
        for _ in range(rng.randint(1, 40))
    )
    max_tokens = rng.randint(1, 48)
    stream = rng.random() < 0.5
    kind = rng.choice(["chat", "completions", "generate"])
    if kind == "chat":
        msgs = [{"role": "user", "content": words}]
        return "/v1/chat/completions", {
            "model": model,
            "messages": msgs,
            "max_tokens": max_tokens,
            "stream": stream,
            "temperature": rng.choice([0, 0.8]),
        }
    if kind == "completions":
        return "/v1/completions", {
            "model": model,
            "prompt": words,
            "max_tokens": max_tokens,
            "stream": stream,
            "n": rng.choice([1, 1, 2]),
        }
    return "/generate", {"text": words, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.7}, "stream": stream}  # fmt: skip


async def client_loop(
    client: httpx.AsyncClient, seed: int, model: str, deadline: float, counts: Counter
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        path, payload = body(rng, model)
        cut = rng.random() < 0.1  # this client gives up early: a disconnect mid-stream
        timeout = rng.uniform(0.05, 0.5) if cut else 120.0
        try:
            async with client.stream("POST", path, json=payload, timeout=timeout) as resp:
                async for _ in resp.aiter_bytes():
                    pass
            counts[f"{resp.status_code // 100}xx"] += 1
        except httpx.TimeoutException:
            counts["cut" if cut else "hang"] += 1


async def sample_memory(
    pids: dict[str, int], deadline: float, every_s: float
) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {name: [] for name in pids}
    while time.monotonic() < deadline:
        for name, pid in pids.items():
            series[name].append(rss_mib(pid))
        await asyncio.sleep(every_s)
    return series


async def settle(client: httpx.AsyncClient, timeout_s: float) -> dict[str, Any]:
    """/server_info once nothing is in flight and every worker reports all pages free (or timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = (await client.get("/server_info")).json()
        free = all(w.get("num_free_pages") == w.get("num_total_pages") for w in info["workers"])
        if (info["num_requests_in_flight"] == 0 and free) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.5)


def growth(series: list[float]) -> float:
    q = max(len(series) // 4, 1)
    early = series[q : 2 * q] or series[:1]
    late = series[-q:]
    base = sum(early) / len(early)
    return (sum(late) / len(late)) / base - 1 if base else 0.0


async def run(cluster: Cluster, args: argparse.Namespace) -> int:
    pids = {c.name: c.proc.pid for c in cluster.children}
    deadline = time.monotonic() + args.minutes * 60
    counts: Counter = Counter()
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=cluster.url, limits=limits, timeout=30) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        memory = asyncio.create_task(sample_memory(pids, deadline, args.sample_s))
        loops = [client_loop(client, i, model, deadline, counts) for i in range(args.concurrency)]
        await asyncio.gather(*loops)
        series = await memory
        info = await settle(client, 30.0)
    return report(counts, series, info, args)


def report(counts: Counter, series: dict[str, list[float]], info: dict[str, Any], args: Any) -> int:
    print(f"\nrequests: {dict(counts)}  (in {args.minutes:g} min, concurrency {args.concurrency})")
    print(f"{'process':<12} {'rss start MiB':>14} {'rss end MiB':>12} {'growth':>8}")
    worst = 0.0
    for name, s in series.items():
        g = growth(s) if s else 0.0
        worst = max(worst, g)
        print(f"{name:<12} {s[0] if s else 0:>14.1f} {s[-1] if s else 0:>12.1f} {g:>8.1%}")
    pages = [
        (w["name"], w.get("num_free_pages"), w.get("num_total_pages")) for w in info["workers"]
    ]
    print(f"in flight after: {info['num_requests_in_flight']}; pages free/total: {pages}")
    failed = counts["hang"] or counts["5xx"] or info["num_requests_in_flight"]
    failed = failed or any(free != total for _, free, total in pages) or worst > args.max_growth
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        topology = Topology.for_model(str(model), mode="pd", device="cpu", port=_free_port(),
                                      kv_transfer="tcp", num_pages=2048, page_size=4)  # fmt: skip
        with Cluster(topology, log_level="warning", start_timeout_s=180) as cluster:
            code = asyncio.run(run(cluster, args))
    sys.exit(code)


if __name__ == "__main__":
    main()
