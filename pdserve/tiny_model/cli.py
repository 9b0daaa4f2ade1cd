"""`pdserve tiny-model OUT_DIR`: write a tiny random-weight model directory, offline."""

from __future__ import annotations

import argparse
import functools

from pdserve.tiny_model.build import ARCHS

VLM_ARCHS = (
    "qwen2_vl",
    "qwen2_5_vl",
    "llava_onevision",
    "llava_next",
    "llava_next_qwen2",
    "pixtral",
    "mistral3",
)  # vlm, llava

KINDS = ("generation", "embedding", "reward")

DESCRIPTION = """\
Write a tiny random-weight Hugging Face model into OUT_DIR, in seconds and without a
download: a byte-level BPE tokenizer (512 tokens, ChatML chat template, EOS <|im_end|>),
config.json, generation_config.json and model.safetensors (float32, hidden 64, 2 layers,
4 query heads over 2 KV heads). transformers' AutoModelForCausalLM and AutoTokenizer load it
as-is. Its output is noise; it exists to test serving code against transformers.
--kind embedding writes a bare decoder (AutoModel) with a sentence-transformers pooling
config; --kind reward a *ForSequenceClassification model (AutoModelForSequenceClassification).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `tiny-model` subcommand; the handler is in `args.handler`."""
    parser = subparsers.add_parser(
        "tiny-model",
        help="write a tiny random-weight model directory (no download)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory to write (created if missing)"
    )
    parser.add_argument(
        "--arch",
        choices=(*ARCHS, *VLM_ARCHS),
        default="llama",
        help="llama: untied embeddings, llama3 rope scaling; qwen2: q/k/v biases, tied "
        "embeddings; qwen3: q/k RMSNorm, tied embeddings; qwen2_vl, qwen2_5_vl, "
        "llava_onevision, llava_next, llava_next_qwen2 (a Qwen2 decoder), pixtral, mistral3: "
        "vision-language "
        "models with their image processor config "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the random weights; the same seed gives identical weights "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="generation",
        help="generation: *ForCausalLM; embedding: a bare decoder with a sentence-transformers "
        "pooling config (serve it with --is-embedding, or let pdserve detect it); reward: "
        "*ForSequenceClassification with a score head (default: %(default)s)",
    )
    parser.add_argument(
        "--pooling",
        choices=("last", "mean", "cls"),
        default="last",
        help="--kind embedding: how token states become one vector (default: %(default)s)",
    )
    parser.add_argument(
        "--num-labels",
        type=int,
        default=1,
        help="--kind reward: rows of the score head (default: %(default)s)",
    )
    parser.add_argument(
        "--eagle",
        action="store_true",
        help="write an EAGLE-2 draft head for the tiny model instead (random weights; serve it "
        "with --speculative-algorithm EAGLE --speculative-draft-model-path OUT_DIR)",
    )
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pdserve.tiny_model.build import build_tiny_model
    from pdserve.tiny_model.pooling_models import (
        build_tiny_embedding_model,
        build_tiny_reward_model,
    )

    if args.arch in VLM_ARCHS:
        if args.kind != "generation":
            raise ValueError(f"--arch {args.arch} takes --kind generation, got {args.kind!r}")
        from pdserve.tiny_model import llava
        from pdserve.tiny_model.vlm import build_tiny_vlm

        builders = {
            "llava_onevision": llava.build_tiny_llava_onevision,
            "llava_next": llava.build_tiny_llava_next,
            "llava_next_qwen2": functools.partial(llava.build_tiny_llava_next, decoder="qwen2"),
            "pixtral": llava.build_tiny_pixtral,
            "mistral3": functools.partial(llava.build_tiny_pixtral, mistral3=True),
        }
        if args.arch in builders:
            print(builders[args.arch](args.out_dir, seed=args.seed))
        else:
            print(build_tiny_vlm(args.out_dir, seed=args.seed, arch=args.arch))
        return 0
    if getattr(args, "eagle", False):
        from pdserve.tiny_model.eagle import build_tiny_eagle_head

        path = build_tiny_eagle_head(args.out_dir, seed=args.seed)
    elif args.kind == "embedding":
        path = build_tiny_embedding_model(
            args.out_dir, arch=args.arch, pooling=args.pooling, seed=args.seed
        )
    elif args.kind == "reward":
        if args.num_labels < 1:
            raise ValueError(f"--num-labels={args.num_labels} is invalid: expected >= 1")
        path = build_tiny_reward_model(
            args.out_dir, arch=args.arch, num_labels=args.num_labels, seed=args.seed
        )
    else:
        path = build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, progress=True)
    print(path)
    return 0
