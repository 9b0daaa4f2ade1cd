"""`pdserve bench serve --num-client-procs N`: the load sent from N processes is measured as one
run (every request, in order, timed by the process that sent it), within the same concurrency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdserve.bench.client_procs import num_shards, shard_config
from pdserve.bench.serve import ServeConfig


def _serve(run_bench: Any, fake: Any, tmp_path: Path, *extra: str) -> dict[str, Any]:
    fake.reset(fail_pattern=True)
    out = tmp_path / "result.json"
    argv = ["serve", "--base-url", fake.base_url, "--tokenizer", "none", "--disable-tqdm"]
    argv += ["--input-len", "8", "--output-len", "5", "--output-json", str(out), *extra]
    assert run_bench(argv) == 0
    return json.loads(out.read_text())


def test_three_client_processes_measure_every_request_as_one_process_does(
    run_bench: Any, fake_server: Any, tmp_path: Path
) -> None:
    args = ["--num-prompts", "10", "--max-concurrency", "4", "--num-client-procs", "3"]
    result = _serve(run_bench, fake_server, tmp_path, *args)
    # As with one process (test_serve.py): of 10 requests in arrival order, 2 get HTTP 500 and
    # 2 an error event; here arrival order is per process, so only the counts are fixed.
    assert (result["num_requests"], result["completed"] + result["failed"]) == (10, 10)
    assert result["total_output_tokens"] == result["completed"] * 5
    assert result["num_itl"] == result["completed"] * 4
    ok = [i for i, e in enumerate(result["errors_per_request"]) if e is None]
    assert all(result["ttfts"][i] >= fake_server.FIRST_DELAY_S for i in ok)
    # The server spaces tokens GAP_S apart; a loaded client may read two at once, but a
    # request's gaps add up to its 4 spacings.
    assert all(sum(result["itls"][i]) >= 4 * fake_server.GAP_S * 0.9 for i in ok)
    assert fake_server.max_in_flight <= 4
    assert result["config"]["num_client_procs"] == 3


def test_concurrency_and_rate_are_dealt_out_between_processes() -> None:
    config = ServeConfig(
        base_url="http://x", max_concurrency=5, request_rate=30.0, seed=7, num_client_procs=3
    )
    shards = [shard_config(config, 3, k) for k in range(3)]
    assert [s.max_concurrency for s in shards] == [2, 2, 1]
    assert all(s.request_rate == 10.0 and s.num_client_procs == 1 for s in shards)
    assert len({s.seed for s in shards}) == 3
    assert num_shards(config, num_requests=2) == 2  # never more processes than requests
