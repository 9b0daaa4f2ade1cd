"""Embeddings with the offline Engine: `Engine(model_path, is_embedding=True).encode(prompts)`
(SGLang's engine/embedding.py).

Usage:
    python examples/engine/embedding.py                            # tiny offline model
    python examples/engine/embedding.py --model /models/gte-Qwen2-1.5B-instruct
    python examples/engine/embedding.py --device cpu --in-process

Without --model it builds a tiny random-weight embedding model (mean pooling, normalized; a few
seconds, offline), so the vectors are noise; the serving path is the real one.
"""

from __future__ import annotations

import argparse

import pdserve


def tiny_model() -> str:
    """A tiny embedding model, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model.pooling_models import cached_tiny_pooling_model

    return str(cached_tiny_pooling_model("embedding"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an embedding model directory (default: tiny model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--in-process", action="store_true", help="run the engine core in this process"
    )
    args = parser.parse_args()

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    llm = pdserve.Engine(
        model_path=args.model or tiny_model(),
        is_embedding=True,
        device=args.device,
        in_process=args.in_process,
    )
    outputs = llm.encode(prompts)
    for prompt, output in zip(prompts, outputs):
        print("===============================")
        print(f"Prompt: {prompt}\nEmbedding vector: {output['embedding'][:8]}")
        print(f"Dimensions: {len(output['embedding'])}")
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
