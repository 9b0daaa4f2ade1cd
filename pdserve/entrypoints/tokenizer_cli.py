"""`pdserve tokenizer`: one tokenizer process that joins a running router (issue 19).

    pdserve tokenizer --router tcp://ROUTER_HOST:8001 --model PATH --host MY_ADDRESS

The router runs with `router: {membership: true}`; `--router` is its internal inbox (the HTTP
port + 1). The tokenizer needs the model's tokenizer files only (no weights, no GPU) and the
cluster secret (`$PDSERVE_CLUSTER_SECRET`), which authenticates and encrypts every socket. It
runs in this process: SIGTERM (or Ctrl-C) drains it (tokenizer_proc/joining.py).
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from pdserve import env

_DEFAULT_ROUTER = "tcp://127.0.0.1:8001"


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="start one tokenizer process that joins a running router (router.membership)",
        description="Load the tokenizer, register with the router, serve until SIGTERM, then "
        "drain: the router routes nothing new here and the requests it holds finish.",
    )
    p.add_argument(
        "--router",
        default=_DEFAULT_ROUTER,
        help="the router's internal inbox, tcp://HOST:PORT (its HTTP port + 1; default "
        f"{_DEFAULT_ROUTER})",
    )
    p.add_argument("--model", "--model-path", dest="model", required=True)
    p.add_argument(
        "--name", default=None, help="unique in the cluster (default: tokenizer-host-pid)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address this tokenizer's inbox binds and the others reach it at (default "
        "127.0.0.1: the router's machine only)",
    )
    p.add_argument("--port", type=int, default=0, help="the inbox's port (default: a free one)")
    p.add_argument(
        "--max-context-len",
        type=int,
        default=0,
        help="the longest prompt + completion in tokens (default 0: the model's own; the "
        "router's limit applies too)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=130.0,
        help="on SIGTERM, stop after this long even if the router never lets go",
    )
    p.set_defaults(handler=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from pdserve import curve_auth
    from pdserve.membership import JoinOptions
    from pdserve.tokenizer_proc.joining import run_joined

    if not args.router.startswith("tcp://"):
        raise ValueError(f"--router {args.router!r} is invalid: expected tcp://HOST:PORT")
    if env.cluster_secret() is None:
        raise ValueError(
            f"${env.CLUSTER_SECRET_VAR} is not set: a tokenizer joins over tcp, authenticated "
            "with the cluster secret: export the router's"
        )
    curve_auth.set_cluster_secret(None)  # every socket takes it from the environment
    spec = tokenizer_spec(args)
    options = JoinOptions(
        router_inbox=args.router,
        advertise_host=args.host,
        drain_timeout_s=args.drain_timeout_s,
    )
    return run_joined(spec, options)


def tokenizer_spec(args: argparse.Namespace) -> Any:
    """The TokenizerSpec of `args`; refuses a model directory without a tokenizer up front."""
    from pdserve.config.process_specs import TokenizerSpec

    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is invalid: expected a model directory")
    if args.max_context_len < 0:
        raise ValueError(f"--max-context-len {args.max_context_len} is invalid: expected >= 0")
    return TokenizerSpec(
        name=args.name or f"tokenizer-{socket.gethostname()}-{os.getpid()}",
        idx=0,  # the router assigns it at the welcome
        model_path=args.model,
        inbox=f"tcp://{args.host}:{args.port or '*'}",
        router_inbox=args.router,
        worker_inboxes=(),  # from the router's PeerTable
        max_context_len=args.max_context_len,
        trust_remote_code=args.trust_remote_code,
        heartbeat_interval_s=args.heartbeat_interval_s,
    )
