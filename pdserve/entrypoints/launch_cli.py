"""`pdserve launch` and `pdserve demo`: parse flags into a Topology, then run a Cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from pdserve import env
from pdserve.config.engine_config import (
    LOG_LEVELS,
    PARALLEL_SIZE_OPTIONS,
    SchedulerConfig,
    aliases_of,
    translate_options,
)
from pdserve.config.lora_config import LORA_KEYS
from pdserve.config.sampling_params import REASONING_PARSERS
from pdserve.config.speculative_config import ALGORITHMS, SPECULATIVE_KEYS

logger = logging.getLogger(__name__)

_SCHED_HELP = {
    "page_size": "tokens per KV page",
    "max_batch_tokens": "tokens (prefill chunks + decodes) in one forward pass",
    "chunk_size": "longest prefill piece of one request per step",
    "decode_step_prefill_tokens": "most prompt tokens in a step that carries decodes (0: no cap)",
    "max_running_requests": "requests decoding at once per worker",
    "num_pages": "KV pages per worker (default: sized from --mem-fraction)",
    "mem_fraction": "fraction of free device memory given to the KV pool",
    "max_context_len": "longest prompt + output (default: the model's)",
}


# Options beside the scheduler's that the launch flags set (all None unless given).
_ENGINE_FLAG_KEYS = (
    "seed",
    "cuda_graph",
    "overlap_schedule",
    "cuda_graph_max_batch",
    "piecewise_graph_max_tokens",
    "is_embedding",
    *PARALLEL_SIZE_OPTIONS,
    *LORA_KEYS,
    *SPECULATIVE_KEYS,
)


def _flags(name: str, negate: bool = False) -> list[str]:
    """`--name` and its SGLang spellings (engine_config.SGLANG_ALIASES), e.g. --mem-fraction and
    --mem-fraction-static; with `negate`, only the aliases that switch `name` off."""
    names = ([] if negate else [name]) + aliases_of(name, negate)
    return ["--" + n.replace("_", "-") for n in names]


def _add_scheduler_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SchedulerConfig):
        if f.name == "enable_prefix_cache":
            parser.add_argument(
                "--no-prefix-cache",
                *_flags(f.name, negate=True),
                dest="enable_prefix_cache",
                action="store_false",
                default=None,
                help="disable the radix prefix cache",
            )
            continue
        kind = float if f.name == "mem_fraction" else int
        parser.add_argument(
            *_flags(f.name),
            dest=f.name,
            type=kind,
            default=None,
            help=f"{_SCHED_HELP.get(f.name, f.name)} (default: {f.default})",
        )


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Worker settings beside the scheduler's, and SGLang's flags pdserve takes as they are."""
    parser.add_argument(*_flags("seed"), dest="seed", type=int, default=None, help="sampling seed")
    parser.add_argument(
        "--no-cuda-graph",
        *_flags("cuda_graph", negate=True),
        dest="cuda_graph",
        action="store_false",
        default=None,
        help="run decode steps eagerly (no CUDA graphs)",
    )
    parser.add_argument(
        "--no-overlap-schedule",
        *_flags("overlap_schedule", negate=True),
        dest="overlap_schedule",
        action="store_false",
        default=None,
        help="wait for each step's tokens before scheduling the next one (by default the host "
        "schedules and builds step N+1 while the device runs step N)",
    )
    parser.add_argument(
        *_flags("cuda_graph_max_batch"),
        dest="cuda_graph_max_batch",
        type=int,
        default=None,
        help="largest decode batch captured in a CUDA graph",
    )
    parser.add_argument(
        *_flags("piecewise_graph_max_tokens"),
        dest="piecewise_graph_max_tokens",
        type=int,
        default=None,
        help="prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs "
        "(captured per token bucket at startup; attention runs between them); 0: eager",
    )
    parser.add_argument(
        "--is-embedding",
        dest="is_embedding",
        action="store_true",
        default=None,
        help="serve the model as an embedding or reward model (/v1/embeddings, /encode, "
        "/classify; no generation); default: detected from the model directory",
    )
    for name in PARALLEL_SIZE_OPTIONS:
        help_text = "SGLang's flag; only 1 is supported"
        if name == "tp_size":
            help_text = "tensor-parallel ranks of each worker (one process and device per rank)"
        parser.add_argument(*_flags(name), type=int, default=None, help=help_text)
    _add_lora_flags(parser)
    _add_speculative_flags(parser)
    parser.add_argument(  # also here, so that SGLang's `launch ... --log-level X` works
        "--log-level", choices=list(LOG_LEVELS), default=argparse.SUPPRESS, help="logging level"
    )


def _add_lora_flags(parser: argparse.ArgumentParser) -> None:
    """LoRA adapters, with SGLang's flag names."""
    parser.add_argument(
        "--lora-paths",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT format) to load at start: NAME=PATH, or PATH (named by its folder)",
    )
    parser.add_argument(
        "--max-loras-per-batch",
        type=int,
        default=None,
        help="adapter slots on the device: distinct adapters in one batch (default: 8)",
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest adapter rank (default: the largest of --lora-paths; give it to load "
        "adapters later without any at start)",
    )
    parser.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="projections adapters may target: q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj, or all (default: those of --lora-paths)",
    )


def _add_speculative_flags(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding on the decode-side worker, with SGLang's flag names."""
    parser.add_argument(
        "--speculative-algorithm",
        type=str.upper,
        choices=list(ALGORITHMS),
        default=None,
        help="speculative decoding on the decode (or mixed) worker: NGRAM (prompt lookup, no "
        "draft model) or EAGLE (an EAGLE-2 head, --speculative-draft-model-path)",
    )
    parser.add_argument(
        "--speculative-draft-model-path", default=None, help="EAGLE: the draft head's directory"
    )
    for name, text in (
        ("speculative_num_steps", "EAGLE: draft steps (default: 3)"),
        ("speculative_eagle_topk", "EAGLE: candidates per step, > 1: a tree (default: 1)"),
        ("speculative_num_draft_tokens", "tokens per row in a verify pass (default: 4)"),
        ("speculative_ngram_min_match_window_size", "NGRAM: shortest suffix looked up (1)"),
        ("speculative_ngram_max_match_window_size", "NGRAM: longest suffix looked up (12)"),
    ):
        parser.add_argument(*_flags(name), type=int, default=None, help=text)


def _add_api_key_flags(parser: argparse.ArgumentParser) -> None:
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="require the bearer token in this file (its first line) on every route but /health "
        "(default: $PDSERVE_API_KEY; with --topology: router.api_key, else $PDSERVE_API_KEY)",
    )
    key.add_argument(
        "--api-key",
        default=None,
        help="the bearer token itself; every user of the machine sees it in `ps`: prefer "
        "--api-key-file or $PDSERVE_API_KEY",
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
        "--model-path",
        dest="model",
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
    _add_api_key_flags(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    p.add_argument("--kv-transfer", choices=["auto", "tcp", "cuda_ipc", "nccl"], default=None)
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on shutdown",
    )
    _add_router_flags(p)
    _add_scheduler_flags(p)
    _add_engine_flags(p)
    p.set_defaults(handler=run_launch)


def _add_router_flags(p: argparse.ArgumentParser) -> None:
    """What the router and its tokenizers do with requests: stores, chat templates, limits."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where uploaded files, batches and their database live; a restart with the same "
        "directory resumes unfinished batches (default: router.data_dir, else "
        "~/.cache/pdserve/data)",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="put chat answers' <think>...</think> part in message.reasoning_content: "
        "deepseek_r1 for models whose prompt opens the thinking (DeepSeek-R1, QwQ), qwen3 for "
        "Qwen3's hybrid models (default: router.reasoning_parser, else off)",
    )
    p.add_argument(
        "--limit-mm-per-prompt",
        type=_media_counts,
        default=None,
        metavar="JSON",
        help="vLLM's flag: the most images and videos one request may send a vision-language "
        'model, e.g. \'{"image": 4, "video": 1}\' (default: tokenizer.image_limits and '
        "video_limits, else 16 images and 4 videos)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="the chat template to use instead of the model's: a Jinja file, or the template "
        "itself (default: topology chat_template, else the model's tokenizer_config.json)",
    )


def _media_counts(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt's JSON: {"image": N, "video": M}, either or both, each >= 1."""
    try:
        counts = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON") from None
    if not isinstance(counts, dict) or not counts or set(counts) - {"image", "video"}:
        raise argparse.ArgumentTypeError(f'{text!r}: expected {{"image": N, "video": M}}')
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: expected an integer >= 1")
    return counts


def _with_media_counts(topology: Any, counts: dict[str, int] | None) -> Any:
    """The topology with --limit-mm-per-prompt's counts in its tokenizer section."""
    if not counts:
        return topology
    section = topology.tokenizer
    changes: dict[str, Any] = {}
    if "image" in counts:
        changes["image_limits"] = dataclasses.replace(
            section.image_limits, max_images=counts["image"]
        )
    if "video" in counts:
        changes["video_limits"] = dataclasses.replace(
            section.video_limits, max_videos=counts["video"]
        )
    return dataclasses.replace(topology, tokenizer=dataclasses.replace(section, **changes))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as Topology.for_model options (a parallel size is checked to be 1)."""
    keys = ["host", "port", "api_key", "device", "dtype", "kv_transfer", "chat_template",
            *_ENGINE_FLAG_KEYS]  # fmt: skip
    keys += [f.name for f in dataclasses.fields(SchedulerConfig)]
    return translate_options({k: getattr(args, k, None) for k in keys})


def run_launch(args: argparse.Namespace) -> int:
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster

    if args.topology is not None:
        if not args.topology.is_file():
            raise ValueError(f"--topology {str(args.topology)!r}: no such file")
        topology = Topology.from_yaml(args.topology)
        overrides = _overrides(args)
        address = {k: overrides.pop(k) for k in ("host", "port") if k in overrides}
        if args.limit_mm_per_prompt is not None:
            overrides["limit_mm_per_prompt"] = args.limit_mm_per_prompt
        if overrides:
            raise ValueError(
                "with --topology, set options in the file, not as flags (only --host and "
                f"--port override its router section): {sorted(overrides)}"
            )
        topology = topology.with_router_address(**address)
        file_key = _read_api_key_file(args.api_key_file)
        if file_key and topology.router.api_key is not None:
            raise ValueError("--api-key-file is given and router.api_key is set: expected one")
        key = topology.router.api_key or file_key or env.api_key()
        if key != topology.router.api_key:
            router = dataclasses.replace(topology.router, api_key=key)
            topology = dataclasses.replace(topology, router=router)
    else:
        mode = "mixed" if args.mixed else "pd"
        overrides = _overrides(args)
        overrides.setdefault("api_key", _read_api_key_file(args.api_key_file) or env.api_key())
        topology = Topology.for_model(args.model, mode=mode, **overrides)
        topology = _with_media_counts(topology, args.limit_mm_per_prompt)
    topology = _with_router_environment(topology, args)
    return _serve(Cluster(topology, node=args.node, log_level=args.log_level), args.grace_period)


def _read_api_key_file(path: Path | None) -> str | None:
    """The API key in `path` (its first line, stripped); None without a path."""
    if path is None:
        return None
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {str(path)!r}: cannot read it: {e}") from None
    if not lines or not lines[0].strip():
        raise ValueError(
            f"--api-key-file {str(path)!r} is empty: expected the key on its first line"
        )
    return lines[0].strip()


def _with_router_environment(topology: Any, args: argparse.Namespace) -> Any:
    """The topology with this machine's router settings: --data-dir, and the port Vertex AI
    gives a serving container (AIP_HTTP_PORT) unless --port says otherwise."""
    changes: dict[str, Any] = {}
    if args.data_dir is not None:
        changes["data_dir"] = str(args.data_dir)
    if getattr(args, "reasoning_parser", None) is not None:
        changes["reasoning_parser"] = args.reasoning_parser
    vertex_port = env.vertex_env().http_port
    if vertex_port is not None and args.port is None:
        logger.info("router port %d from AIP_HTTP_PORT", vertex_port)
        changes["port"] = vertex_port
    if not changes:
        return topology
    router = dataclasses.replace(topology.router, **changes)
    return dataclasses.replace(topology, router=router)


def _serve(cluster: Any, grace_s: float) -> int:
    cluster.start()
    print(f"pdserve is ready at {cluster.url}  (OpenAI base URL: {cluster.url}/v1)", flush=True)
    return cluster.serve_forever(grace_s)  # 1: the router was lost for good


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
    return cluster.serve_forever(grace_s=10.0)
