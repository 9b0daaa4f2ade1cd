"""Offline generation on a tp x dp mesh of processes started by torchrun (SGLang's
engine/offline_batch_inference_torchrun.py).

Usage:
    torchrun --nproc_per_node=4 examples/engine/offline_batch_inference_torchrun.py \
        --tp-size 2 --dp-size 2 --device cpu          # tiny offline model, gloo
    torchrun --nproc_per_node=8 examples/engine/offline_batch_inference_torchrun.py \
        --model /models/Llama-3.1-8B-Instruct --tp-size 4 --dp-size 2   # 8 GPUs, NCCL

Every process builds an `EngineFragment` for its tp rank; each dp group (a tp group) generates
its share of the prompts, and the group's rank 0 prints them.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import pdserve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tp-size", type=int, default=2)
    parser.add_argument("--dp-size", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--num-pages", type=int, default=None, help="KV pool pages per rank (default: from memory)"
    )
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    mesh = init_device_mesh(device, (args.dp_size, args.tp_size), mesh_dim_names=("dp", "tp"))
    tp_rank, dp_rank = mesh.get_local_rank("tp"), mesh.get_local_rank("dp")

    model = args.model
    if model is None:  # pdserve demo's tiny model, built once (rank 0 first, the others wait)
        from pdserve.tiny_model import cached_tiny_model

        if dist.get_rank() == 0:
            cached_tiny_model()
        dist.barrier()
        model = str(cached_tiny_model())

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = {
        "temperature": args.temperature,
        "top_p": 0.95,
        "max_new_tokens": args.max_new_tokens,
    }
    fragment = pdserve.EngineFragment(
        model,
        tp_size=args.tp_size,
        tp_rank=tp_rank,
        tp_group=mesh["tp"].get_group(),
        device_index=local_rank,
        device=device,
        num_pages=args.num_pages,
    )
    my_prompts = prompts[dp_rank :: args.dp_size]  # each dp group its own share
    outputs = fragment.generate(my_prompts, sampling_params)
    if fragment.is_leader:
        for prompt, output in zip(my_prompts, outputs):
            print(
                f"[dp {dp_rank}] Prompt: {prompt}\nGenerated text: {output['text']!r}", flush=True
            )
    fragment.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
