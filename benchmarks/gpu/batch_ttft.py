"""Online TTFT with a Batch API job running, on the GPU (issue 13, item 3): a 1P1D cluster on one
GPU (cuda_ipc) of a random-weight model at Llama-3.2-1B's shape, online TTFT p50 idle and while a
low-priority batch runs (`router.max_running_batch_lines` at once), printed as a table.

    python benchmarks/gpu/batch_ttft.py [--lines 4000] [--batch-tokens 256] [--running-lines 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import httpx
import openai

from pdserve.bench.batch_ttft import measure_once, ttft_s
from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4000)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--running-lines", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_checkpoint, beside this
    import random_checkpoint as rc

    out = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    with tempfile.TemporaryDirectory() as tmp:
        model = rc.write_checkpoint(rc.LLAMA_1B, Path(tmp) / "llama-1b", "cuda")
        router = {"port": _free_port(), "data_dir": str(Path(tmp) / "data"),
                  "max_running_batch_lines": args.running_lines}  # fmt: skip
        topology = Topology.for_model(str(model), mode="pd", device="cuda", router=router,
                                      kv_transfer="cuda_ipc", mem_fraction=0.3)  # fmt: skip
        with Cluster(topology, log_level="warning", start_timeout_s=600) as cluster:
            api = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
            with httpx.Client(base_url=cluster.url, timeout=120) as client:
                for _ in range(5):
                    ttft_s(client)
                idle, loaded = measure_once(client, api, args.lines, args.batch_tokens)
    row = {"idle_p50_ms": idle * 1e3, "loaded_p50_ms": loaded * 1e3, "ratio": loaded / idle,
           **vars(args)}  # fmt: skip
    (out / "batch_ttft.json").write_text(json.dumps(row, indent=1))
    print("| idle TTFT p50 ms | with batch p50 ms | ratio | lines running at once |")
    print("|---|---|---|---|")
    print(f"| {idle * 1e3:.1f} | {loaded * 1e3:.1f} | {loaded / idle:.2f} | {args.running_lines} |")


if __name__ == "__main__":
    main()
