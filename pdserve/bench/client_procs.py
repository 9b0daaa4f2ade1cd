"""`bench serve`'s load sent from several client processes (`--num-client-procs`).

One Python client reading a few hundred streams falls behind at some ten thousand chunks a second
(each chunk is a socket read, an HTTP/1.1 parse and a JSON decode); chunks then wait in its socket
buffers and are read several at once, which the run would report as the server's clumped tokens
(a tiny ITL p50, a long p90) and a longer TPOT. Spread over processes, the client keeps up.

Requests are dealt round-robin; each process gets its share of `max_concurrency` and of the
request rate (merged Poisson arrivals are Poisson at the whole rate). All processes start sending
at once, after each has built its client, and each times its own requests. As with any
`multiprocessing` spawn, a script that calls this needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import queue
import time
from typing import Any

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.stats import RequestResult

_START_TIMEOUT_S = 120.0  # for every process to import and build its client


def shard_config(config: Any, num_shards: int, shard: int) -> Any:
    """One process's ServeConfig: its share of the concurrency and rate, its own arrival seed."""
    concurrency = config.max_concurrency
    if concurrency is not None:
        concurrency = concurrency // num_shards + (shard < concurrency % num_shards)
    return dataclasses.replace(
        config,
        max_concurrency=concurrency,
        request_rate=config.request_rate / num_shards,
        seed=config.seed + shard,
        disable_tqdm=True,
        num_client_procs=1,
    )


def num_shards(config: Any, num_requests: int) -> int:
    """Processes worth starting: never more than requests, nor than concurrent streams."""
    cap = config.max_concurrency or num_requests
    return max(1, min(config.num_client_procs, num_requests, cap))


def run_in_processes(
    config: Any, model: str, requests: list[BenchRequest], api_key: str | None
) -> tuple[list[RequestResult], float]:
    """Send `requests` from `num_shards(...)` processes; (results in request order, seconds from
    the common start to the last request's end)."""
    shards = num_shards(config, len(requests))
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads, a loop
    go = ctx.Event()
    results: Any = ctx.Queue()  # (shard, "ready" | [RequestResult] | None, error | None)
    procs = []
    for k in range(shards):
        mine = requests[k::shards]
        args = (shard_config(config, shards, k), model, mine, api_key, k, go, results)
        procs.append(ctx.Process(target=_shard_main, args=args, daemon=True))
    for proc in procs:
        proc.start()
    try:
        _collect(results, procs, _START_TIMEOUT_S)  # every process has built its client
        go.set()
        start = time.perf_counter()
        by_shard = _collect(results, procs, None)
        duration = time.perf_counter() - start
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    ordered: list[RequestResult | None] = [None] * len(requests)
    for k, shard_results in by_shard.items():
        ordered[k::shards] = shard_results
    return [r for r in ordered if r is not None], duration


def _collect(results: Any, procs: list[Any], timeout_s: float | None) -> dict[int, Any]:
    """One message from every process (raising on a reported error, a process that died, or
    `timeout_s` passing), by shard."""
    by_shard: dict[int, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(by_shard) < len(procs):
        try:
            k, payload, error = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                code = dead[0].exitcode
                raise RuntimeError(f"a client process exited with code {code}") from None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"client processes not ready within {timeout_s:g} s") from None
            continue
        if error is not None:
            raise RuntimeError(f"client process {k} failed: {error}")
        by_shard[k] = payload
    return by_shard


def _shard_main(
    config: Any,
    model: str,
    requests: list[BenchRequest],
    api_key: str | None,
    shard: int,
    go: Any,
    results: Any,
) -> None:
    """One client process: build the client, say so, wait for the go, send its requests."""
    from pdserve.bench.serve import _client, _run_requests

    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def run() -> list[RequestResult]:
        async with _client(config, api_key) as client:
            results.put((shard, "ready", None))
            if not go.wait(_START_TIMEOUT_S):  # nothing runs on this loop yet: blocking is fine
                raise TimeoutError("no go from the parent")
            return await _run_requests(client, config, model, requests)

    try:
        results.put((shard, asyncio.run(run()), None))
    except BaseException as e:  # the parent must hear of it, not wait for a result
        results.put((shard, None, f"{type(e).__name__}: {e}"))
