"""`pdserve` command line: launch, worker, tokenizer, demo, tiny-model, bench (each in its own
module)."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from pdserve.entrypoints.launch_cli import add_launch_parser

    add_launch_parser(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from pdserve.entrypoints.launch_cli import add_demo_parser

    add_demo_parser(sub)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    from pdserve.entrypoints.worker_cli import add_worker_parser

    add_worker_parser(sub)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    from pdserve.entrypoints.tokenizer_cli import add_tokenizer_parser

    add_tokenizer_parser(sub)


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    from pdserve.tiny_model.cli import add_parser

    add_parser(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from pdserve.bench.cli import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Serve LLMs with prefill and decode disaggregated (OpenAI-compatible API).",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_launch, _add_worker, _add_tokenizer, _add_demo, _add_tiny_model, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except ValueError as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
