"""`pdserve bench serve|offline` argument parsing; defaults come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pdserve.bench.datasets import NO_TOKENIZER
from pdserve.config.engine_config import EngineConfig, SchedulerConfig


def _default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


ENDPOINT_SHORTHANDS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
}


def endpoint_path(value: str) -> str:
    """`--endpoint`: a path, or one of the shorthands completions, chat, embeddings."""
    return ENDPOINT_SHORTHANDS.get(value, value)


def _add_workload(p: argparse.ArgumentParser, cls: type) -> None:
    """The random dataset's flags, shared by serve and offline."""
    p.add_argument("--dataset", default=_default(cls, "dataset"), choices=["random"])
    p.add_argument(
        "--input-len", type=int, default=_default(cls, "input_len"), help="prompt tokens"
    )
    p.add_argument(
        "--output-len", type=int, default=_default(cls, "output_len"), help="tokens generated"
    )
    p.add_argument(
        "--range-ratio",
        type=float,
        default=_default(cls, "range_ratio"),
        help="lengths uniform in [len*(1-r), len*(1+r)]",
    )
    p.add_argument("--num-prompts", type=int, default=_default(cls, "num_prompts"))
    p.add_argument("--seed", type=int, default=_default(cls, "seed"))
    p.add_argument("--output-json", default=None, help="write every number and the config here")


def _add_endpoint(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument(
        "--endpoint",
        type=endpoint_path,
        default=_default(cls, "endpoint"),
        help="a path, or completions | chat | embeddings (/v1/embeddings: the embeddings mode)",
    )
    p.add_argument(
        "--encoding-format",
        default=_default(cls, "encoding_format"),
        choices=["float", "base64"],
        help="embeddings mode: vectors as JSON floats or base64 float32",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from pdserve.bench.serve import ServeConfig, handle

    p = sub.add_parser(
        "serve",
        help="benchmark a running OpenAI-compatible server (pdserve, vLLM, SGLang, ...)",
        description="Streams requests to /v1/completions (or chat) and reports TTFT, TPOT, ITL, "
        "E2E latency, throughput and goodput, like `vllm bench serve`. With --endpoint embeddings "
        "it sends one /v1/embeddings request per prompt and reports requests/s, input tokens/s "
        "and latency percentiles (--output-len is then unused).",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root URL")
    _add_endpoint(p, ServeConfig)
    p.add_argument("--model", default=None, help="model name to send (default: /v1/models)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help=f"tokenizer path or hub name (default: --model); '{NO_TOKENIZER}' sends token ids",
    )
    _add_workload(p, ServeConfig)
    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=_default(ServeConfig, "request_rate"),
        help="requests/s with Poisson arrivals; inf sends all at once",
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    load.add_argument("--num-warmups", type=int, default=_default(ServeConfig, "num_warmups"))
    load.add_argument(
        "--num-client-procs",
        type=int,
        default=_default(ServeConfig, "num_client_procs"),
        help="client processes sending the load: one falls behind a few hundred fast streams",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=_default(ServeConfig, "vocab_size"),
        help="without a tokenizer, random token ids are drawn below this",
    )
    p.add_argument(
        "--timeout-s", type=float, default=_default(ServeConfig, "timeout_s"), help="per request"
    )
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(handler=handle)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "passed to pdserve.Engine (EngineConfig, SchedulerConfig)")
    g.add_argument(
        "--device", default=_default(EngineConfig, "device"), choices=["auto", "cpu", "cuda"]
    )
    g.add_argument(
        "--dtype",
        default=_default(EngineConfig, "dtype"),
        choices=["auto", "float32", "float16", "bfloat16"],
    )
    g.add_argument(
        "--attention-backend",
        default=_default(EngineConfig, "attention_backend"),
        choices=["auto", "torch", "triton", "flashinfer"],
    )
    g.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=_default(EngineConfig, "cuda_graph"),
    )
    for name, kind in [
        ("page_size", int),
        ("max_batch_tokens", int),
        ("chunk_size", int),
        ("decode_step_prefill_tokens", int),
        ("max_running_requests", int),
        ("num_pages", int),
        ("mem_fraction", float),
    ]:
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, type=kind, default=_default(SchedulerConfig, name))


def _add_offline(sub: argparse._SubParsersAction) -> None:
    from pdserve.bench.offline import OfflineConfig, handle

    p = sub.add_parser(
        "offline",
        help="benchmark the in-process Engine's throughput",
        description="Runs random token-id prompts through pdserve.Engine and reports requests/s "
        "and tokens/s, like `vllm bench throughput`.",
    )
    p.add_argument("--model", required=True, help="a Hugging Face model directory")
    _add_workload(p, OfflineConfig)
    p.add_argument(
        "--warmup",
        type=int,
        default=_default(OfflineConfig, "warmup"),
        help="requests run untimed first",
    )
    _add_engine_options(p)
    p.set_defaults(handler=handle)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` with its `serve` and `offline` subcommands."""
    p = subparsers.add_parser("bench", help="serving and offline benchmarks")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    _add_serve(sub)
    _add_offline(sub)
    return p
