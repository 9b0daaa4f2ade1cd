"""A short run of `benchmarks/fuzz_soak.py` against the session's real clusters (prefill + decode
over tcp, and a mixed worker): fuzzed and hostile bodies on every generation route, constraints
(good, broken, too deep, too long grammars), /tokenize, /detokenize, /v1/embeddings and
/abort_request. No 5xx, no hang, only OpenAI error bodies, nothing left in flight, and every
answer a grammar ended satisfies it. The script runs thousands (`--tiny -n 5000`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_script_runner import run_script_main

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fuzz_soak.py"


@pytest.mark.parametrize("cluster_name", ["pd_cluster", "mixed_cluster"])
def test_a_short_fuzz_soak_passes(request: pytest.FixtureRequest, cluster_name: str) -> None:
    cluster: Cluster = request.getfixturevalue(cluster_name)
    argv = ["--url", cluster.url, "-n", "400", "--concurrency", "8", "--seed", "7",
            "--top-errors", "5"]  # fmt: skip
    run = run_script_main(SCRIPT, argv)
    counts, _ = json.JSONDecoder().raw_decode(run.stdout)
    assert run.returncode == 0, run.stdout
    for bad in ("5xx", "hang", "malformed error body", "constrained answer invalid"):
        assert counts.get(bad, 0) == 0, run.stdout
    assert counts["in_flight_after"] == 0
    # Both ends reached: answers (some of them constrained and checked) and refusals.
    assert counts["2xx"] >= 40 and counts["4xx"] >= 40, counts
    assert counts["constrained answers checked"] >= 3, counts
