"""Hugging Face transformers `generate` throughput on a checkpoint: the reference for pdserve's
offline number. Run as a child process (`python hf_generate.py ...`), so a slow torch.compile can be
cut off by a timeout and its GPU memory is given back; prints one `RESULT {json}` line.

Every prompt has the same length (random token ids), so the batch needs no padding; every request
generates exactly --output-len tokens greedily (min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=_DTYPES[args.dtype])
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    vocab = model.config.vocab_size

    def batch() -> torch.Tensor:  # [B, input_len] int64
        ids = rng.integers(0, vocab, size=(args.batch, args.input_len))
        return torch.tensor(ids, device=args.device)

    def generate(ids: torch.Tensor, num_new: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": num_new,
            "min_new_tokens": num_new,
            "do_sample": False,
            "pad_token_id": model.config.pad_token_id or 0,
        }
        if args.mode == "static":  # transformers compiles the decode step for a static cache
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode():
            return model.generate(ids, **kwargs)

    # Static: warm up with the timed length, so the compiled graphs fit the timed cache size.
    warm_new = args.output_len if args.mode == "static" else min(8, args.output_len)
    t0 = time.perf_counter()
    generate(batch(), warm_new)
    _sync(args.device)
    warmup_s = time.perf_counter() - t0
    seconds, new_tokens = [], 0
    for _ in range(args.num_batches):
        ids = batch()
        _sync(args.device)
        t0 = time.perf_counter()
        out = generate(ids, args.output_len)
        _sync(args.device)
        seconds.append(time.perf_counter() - t0)
        new_tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {
        "mode": args.mode,
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_batches": args.num_batches,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "batch_seconds": seconds,
        "output_tokens": new_tokens,
        "output_tok_s": new_tokens / sum(seconds),
        "step_ms": sum(seconds) / len(seconds) / args.output_len * 1e3,
        "compiled_graphs": _compiled_graphs(),
    }


def _compiled_graphs() -> int | None:
    """How many graphs torch.compile built (0: generate ran eagerly)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, TypeError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--mode", default="eager", choices=["eager", "static"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    print("RESULT " + json.dumps(measure(p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
