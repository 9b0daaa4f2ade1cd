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

from pdserve.entrypoints.join_cli import add_join_flags, join_options


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="start one tokenizer process that joins a running router (router.membership)",
        description="Load the tokenizer, register with the router, serve until SIGTERM, then "
        "drain: the router routes nothing new here and the requests it holds finish.",
    )
    add_join_flags(p, "tokenizer", "tokenizer-host-pid")
    p.add_argument(
        "--max-context-len",
        type=int,
        default=0,
        help="the longest prompt + completion in tokens (default 0: the model's own; the "
        "router's limit applies too)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--chat-template",
        default=None,
        help="the chat template to use instead of the model's: a Jinja file, or the template "
        "itself (give the router's cluster the same)",
    )
    p.set_defaults(handler=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from pdserve.tokenizer_proc.joining import run_joined

    options = join_options(args, "tokenizer")
    return run_joined(tokenizer_spec(args), options)


def tokenizer_spec(args: argparse.Namespace) -> Any:
    """The TokenizerSpec of `args`; refuses a model directory without a tokenizer up front."""
    from pdserve.config.process_specs import TokenizerSpec
    from pdserve.config.topology import chat_template_text

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
        chat_template=chat_template_text(args.chat_template) if args.chat_template else None,
    )
