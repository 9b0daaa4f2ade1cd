"""`pdserve worker`: one prefill, decode or mixed worker that joins a running router (issue 19).

    pdserve worker --role decode --router tcp://ROUTER_HOST:8001 --model PATH --host MY_ADDRESS

The router runs with `router: {membership: true}` in its topology; `--router` is its internal
inbox (the HTTP port + 1). Every machine has the same model and the same cluster secret
(`$PDSERVE_CLUSTER_SECRET`), which authenticates and encrypts every socket. The worker runs in
this process: SIGTERM (or Ctrl-C) drains it (worker/joining.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
from typing import Any

from pdserve.entrypoints.join_cli import add_join_flags, join_options


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    from pdserve.entrypoints.launch_cli import _add_engine_flags, _add_scheduler_flags

    p = sub.add_parser(
        "worker",
        help="start one worker that joins a running router (router.membership)",
        description="Load the model, register with the router, serve until SIGTERM, then "
        "drain: the router routes nothing new here and the running requests finish.",
    )
    p.add_argument("--role", choices=["prefill", "decode", "mixed"], required=True)
    add_join_flags(p, "worker", "role-host-pid")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    p.add_argument(
        "--kv-transfer",
        choices=["tcp"],
        default="tcp",
        help="KV pages between joined workers move over tcp (the only backend for them yet)",
    )
    p.add_argument("--kv-timeout-s", type=float, default=None, help="one KV transfer's limit")
    p.add_argument(  # tests only: the topology's fault_injection section, as JSON
        "--fault-injection", default=None, help=argparse.SUPPRESS
    )
    _add_scheduler_flags(p)
    _add_engine_flags(p)
    p.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from pdserve.worker.joining import run_joined

    options = join_options(args, "worker")
    return run_joined(worker_spec(args), options)


def worker_spec(args: argparse.Namespace) -> Any:
    """The WorkerSpec of `args`: engine settings as `pdserve launch --model` makes them."""
    from pdserve.config.engine_config import translate_options
    from pdserve.config.process_specs import KVTransferSpec, WorkerSpec
    from pdserve.config.topology import Topology
    from pdserve.config.topology_sections import FaultInjectionConfig

    options = _engine_options(args)
    if options.get("tp_size", 1) != 1:
        raise ValueError("--tp-size > 1 is not supported for a worker that joins a router yet")
    mode = "mixed" if args.role == "mixed" else "pd"
    topo = Topology.for_model(args.model, mode=mode, **translate_options(options)).resolved()
    # This role's settings (speculative decoding rides on the decode side), on a device of its
    # own: no GPU numbers, so its pool is not sized as if a peer shared the device.
    plan = next(w for w in topo.workers() if w.role == args.role)
    plan = dataclasses.replace(plan, gpus=())
    kv_timeout = args.kv_timeout_s or topo.kv_transfer.timeout_s
    kv = KVTransferSpec(backend="tcp", timeout_s=kv_timeout)
    if args.role == "decode":
        kv = dataclasses.replace(kv, address=f"tcp://{args.host}:*", host=args.host)
    name = args.name or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    faults = FaultInjectionConfig(**json.loads(args.fault_injection or "{}"))
    return WorkerSpec(
        name=name,
        role=args.role,
        idx=0,  # the router assigns it at the welcome
        engine=topo.engine_config(plan),
        inbox=f"tcp://{args.host}:{args.port or '*'}",
        tokenizer_inboxes=(),  # from the router's PeerTable
        kv=kv,
        router_inbox=args.router,
        heartbeat_interval_s=args.heartbeat_interval_s,
        fault_injection=faults,
    )


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from pdserve.config.engine_config import SchedulerConfig
    from pdserve.entrypoints.launch_cli import _ENGINE_FLAG_KEYS

    keys = ["device", "dtype", *_ENGINE_FLAG_KEYS]
    keys += [f.name for f in dataclasses.fields(SchedulerConfig)]
    options = {k: getattr(args, k, None) for k in keys}
    options["kv_transfer"] = "tcp"
    return {k: v for k, v in options.items() if v is not None}
