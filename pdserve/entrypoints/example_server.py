"""The server an example script talks to: one already running (`--base-url`), or a prefill +
decode cluster the script starts on that URL's port for its own duration (`--launch`), serving
`--model` or, without one, the tiny model of `pdserve demo` (built offline on first use)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_server_args(
    parser: argparse.ArgumentParser,
    model_help: str = "with --launch: the model directory (default: the tiny model)",
) -> None:
    """--base-url, --model, --launch and --device, as every server example takes them."""
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


@contextlib.contextmanager
def example_server(
    args: argparse.Namespace,
    model: str | None = None,
    temp_data_dir: bool = False,
    **topology: Any,
) -> Iterator[str]:
    """The base URL: `args.base_url` as given, or (`args.launch`) a prefill + decode cluster
    started on its port, serving `model`, else `args.model`, else the tiny model.
    `temp_data_dir`: the router keeps files and batches in a temporary folder; `topology`: more
    `Topology.for_model` options (`is_embedding=True`, ...)."""
    if not args.launch:
        yield args.base_url
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    with contextlib.ExitStack() as stack:
        if temp_data_dir:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory())
            topology["router"] = {**topology.get("router", {}), "data_dir": data_dir}
        config = Topology.for_model(
            model or args.model or tiny_model(),
            mode="pd",
            device=args.device,
            port=urlparse(args.base_url).port,
            **topology,
        )
        cluster = stack.enter_context(Cluster(config, log_level="warning"))
        yield cluster.url
