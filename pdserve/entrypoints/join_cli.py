"""What `pdserve worker` and `pdserve tokenizer` share: the flags of a process that joins a running
router, and the checks before it tries (issue 19)."""

from __future__ import annotations

import argparse
from typing import Any

from pdserve import env

DEFAULT_ROUTER = "tcp://127.0.0.1:8001"


def add_join_flags(p: argparse.ArgumentParser, what: str, default_name: str) -> None:
    """--router, --model, --name, --host, --port, --heartbeat-interval-s, --drain-timeout-s;
    `what`: "worker" or "tokenizer", for the help texts."""
    p.add_argument(
        "--router",
        default=DEFAULT_ROUTER,
        help="the router's internal inbox, tcp://HOST:PORT (its HTTP port + 1; default "
        f"{DEFAULT_ROUTER})",
    )
    p.add_argument("--model", "--model-path", dest="model", required=True)
    p.add_argument("--name", default=None, help=f"unique in the cluster (default: {default_name})")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"the address this {what}'s sockets bind and the others reach it at (default "
        "127.0.0.1: the router's machine only)",
    )
    p.add_argument("--port", type=int, default=0, help="the inbox's port (default: a free one)")
    p.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=130.0,
        help="on SIGTERM, stop after this long even if the router never lets go",
    )


def join_options(args: argparse.Namespace, what: str) -> Any:
    """The JoinOptions of `args`, after checking the router address and the cluster secret
    (ValueError naming the problem)."""
    from pdserve import curve_auth
    from pdserve.membership import JoinOptions

    if not args.router.startswith("tcp://"):
        raise ValueError(f"--router {args.router!r} is invalid: expected tcp://HOST:PORT")
    if env.cluster_secret() is None:
        raise ValueError(
            f"${env.CLUSTER_SECRET_VAR} is not set: a {what} joins over tcp, authenticated "
            "with the cluster secret: export the router's"
        )
    curve_auth.set_cluster_secret(None)  # every socket takes it from the environment
    return JoinOptions(
        router_inbox=args.router, advertise_host=args.host, drain_timeout_s=args.drain_timeout_s
    )
