"""`pdserve launch` and `pdserve demo`: parse flags into a Topology, then run a Cluster."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from pdserve.config.engine_config import SchedulerConfig

logger = logging.getLogger(__name__)

_SCHED_HELP = {
    "page_size": "tokens per KV page",
    "max_batch_tokens": "tokens (prefill chunks + decodes) in one forward pass",
    "chunk_size": "longest prefill piece of one request per step",
    "max_running_requests": "requests decoding at once per worker",
    "num_pages": "KV pages per worker (default: sized from --mem-fraction)",
    "mem_fraction": "fraction of free device memory given to the KV pool",
    "max_context_len": "longest prompt + output (default: the model's)",
}


def _add_scheduler_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SchedulerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "enable_prefix_cache":
            parser.add_argument(
                "--no-prefix-cache",
                dest="enable_prefix_cache",
                action="store_false",
                default=None,
                help="disable the radix prefix cache",
            )
            continue
        kind = float if f.name == "mem_fraction" else int
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            help=f"{_SCHED_HELP.get(f.name, f.name)} (default: {f.default})",
        )


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start a server from a topology file or a model directory",
        description="Start the router, tokenizers and workers, wait until all are ready, print "
        "the URL, and serve until Ctrl-C (running requests finish within --grace-period).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--topology", type=Path, help="topology YAML (see deploy/topologies/)")
    src.add_argument(
        "--model",
        help="a Hugging Face model directory: one prefill + one decode "
        "worker on what this machine has",
    )
    p.add_argument(
        "--node",
        help="with --topology and nodes: start this machine's processes (run once per node)",
    )
    p.add_argument(
        "--mixed",
        action="store_true",
        help="with --model: one mixed worker instead of prefill + decode",
    )
    p.add_argument("--host", default=None, help="router address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="router port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require this bearer token on every route but /health (default: $PDSERVE_API_KEY; "
        "with --topology: router.api_key in the file, else $PDSERVE_API_KEY)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    p.add_argument("--kv-transfer", choices=["auto", "tcp", "cuda_ipc", "nccl"], default=None)
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on shutdown",
    )
    _add_scheduler_flags(p)
    p.set_defaults(handler=run_launch)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ["host", "port", "api_key", "device", "dtype", "kv_transfer"]
    keys += [f.name for f in dataclasses.fields(SchedulerConfig)]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def run_launch(args: argparse.Namespace) -> int:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    if args.topology is not None:
        if not args.topology.is_file():
            raise ValueError(f"--topology {str(args.topology)!r}: no such file")
        topology = Topology.from_yaml(args.topology)
        if _overrides(args):
            raise ValueError(
                "with --topology, set options in the file, not as flags: "
                f"{sorted(_overrides(args))}"
            )
        env_key = os.environ.get("PDSERVE_API_KEY")
        if env_key and topology.router.api_key is None:
            router = dataclasses.replace(topology.router, api_key=env_key)
            topology = dataclasses.replace(topology, router=router)
    else:
        mode = "mixed" if args.mixed else "pd"
        overrides = _overrides(args)
        overrides.setdefault("api_key", os.environ.get("PDSERVE_API_KEY"))
        topology = Topology.for_model(args.model, mode=mode, **overrides)
    return _serve(Cluster(topology, node=args.node, log_level=args.log_level), args.grace_period)


def _serve(cluster: Any, grace_s: float) -> int:
    cluster.start()
    print(f"pdserve is ready at {cluster.url}  (OpenAI base URL: {cluster.url}/v1)", flush=True)
    cluster.serve_forever(grace_s)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="serve a tiny local model disaggregated on CPU (no downloads)",
        description="Build the tiny random-weight model into a cache folder if needed, then "
        "serve it with one prefill and one decode worker on CPU over the tcp KV transfer.",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve",
        help="where the tiny model is kept",
    )
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster
    from pdserve.tiny_model import cached_tiny_model

    print(f"using the tiny model in {args.cache_dir / 'tiny-llama'} (built if missing)", flush=True)
    model_dir = cached_tiny_model(args.cache_dir)
    topology = Topology.for_model(
        str(model_dir), mode="pd", device="cpu", port=args.port, kv_transfer="tcp", num_pages=2048
    )
    cluster = Cluster(topology, log_level=args.log_level)
    cluster.start()
    name = model_dir.name
    print(
        f"\npdserve demo is ready at {cluster.url} (prefill + decode workers, KV over tcp)\n"
        "Try:\n"
        f"  curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{name}", "messages": [{{"role": "user", '
        f'"content": "Hello!"}}], "max_tokens": 32}}\'\n'
        "(random weights: the text is gibberish; the serving path is real)\n",
        flush=True,
    )
    cluster.serve_forever(grace_s=10.0)
    return 0
