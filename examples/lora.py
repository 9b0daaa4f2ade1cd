"""LoRA adapters per request (SGLang's lora.py): a server launched with adapters, and /generate
naming one adapter per prompt in `lora_path` (null: the base model).

Usage:
    # a server started with adapters (PEFT directories):
    pdserve launch --model PATH --lora-paths /adapters/sql lora1=/adapters/chat
    python examples/lora.py --base-url http://127.0.0.1:8000 --lora-names sql lora1
    # or start a prefill + decode server with two random adapters for the duration of the script:
    python examples/lora.py --launch --device cpu

With --launch and no --model, it serves pdserve's tiny random-weight model with two random
adapters written into a temporary folder (offline, no peft needed), so the texts are gibberish;
each adapter still changes what the model says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx


def random_adapter(model_dir: str, out: Path, rank: int, seed: int) -> Path:
    """A random LoRA adapter on q_proj and v_proj, in PEFT's format (config + safetensors)."""
    import torch
    from safetensors.torch import save_file

    hf = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    out_dims = {"q_proj": heads * head_dim,
                "v_proj": hf.get("num_key_value_heads", heads) * head_dim}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]):
        for module, out_dim in out_dims.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(out_dims), "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, list[str]]]:
    """(the base URL, the adapter names): --base-url as given, or a server started on its port."""
    if not args.launch:
        yield args.base_url, args.lora_names
        return
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster
    from pdserve.tiny_model import cached_tiny_model

    model = args.model or str(cached_tiny_model())
    with tempfile.TemporaryDirectory() as tmp:
        first = random_adapter(model, Path(tmp) / "test_lora", rank=8, seed=1)
        second = random_adapter(model, Path(tmp) / "lora1", rank=4, seed=2)
        # A bare path is named by its folder ("test_lora"); NAME=PATH names it.
        paths = [str(first), f"lora1={second}"]
        port = urlparse(args.base_url).port
        topology = Topology.for_model(
            model, mode="pd", device=args.device, port=port, lora_paths=paths
        )
        with Cluster(topology, log_level="warning") as cluster:
            yield cluster.url, ["test_lora", "lora1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="with --launch: the model directory (default: tiny)")
    parser.add_argument("--launch", action="store_true", help="start a server on --base-url")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--lora-names", nargs=2, default=["test_lora", "lora1"])
    args = parser.parse_args()

    with server(args) as (base_url, (first, second)):
        json_data = {
            "text": [
                "prompt 1",
                "prompt 2",
                "prompt 3",
                "prompt 4",
                "prompt 5",
            ],
            "sampling_params": {"max_new_tokens": 32, "temperature": 0},
            "lora_path": [first, second, None, second, first],
        }
        response = httpx.post(base_url + "/generate", json=json_data, timeout=300)
        response.raise_for_status()
        print(json.dumps(response.json()))
        for lora, item in zip(json_data["lora_path"], response.json()):
            print(f"Adapter {lora}: {item['text']!r}")


if __name__ == "__main__":
    main()
