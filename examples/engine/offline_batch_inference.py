"""Generate for a batch of prompts with the offline Engine (SGLang's
engine/offline_batch_inference.py).

Usage:
    python examples/engine/offline_batch_inference.py                 # tiny offline model
    python examples/engine/offline_batch_inference.py --model /models/Llama-3.2-1B-Instruct
    python examples/engine/offline_batch_inference.py --device cpu --in-process

Without --model it builds pdserve's tiny random-weight model (a few seconds, offline), so the
text is gibberish; the serving path is the real one.
"""

from __future__ import annotations

import argparse

import pdserve


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
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
    sampling_params = {"temperature": 0.8, "top_p": 0.95}

    llm = pdserve.Engine(
        model_path=args.model or tiny_model(), device=args.device, in_process=args.in_process
    )
    outputs = llm.generate(prompts, sampling_params)
    for prompt, output in zip(prompts, outputs):
        print("===============================")
        print(f"Prompt: {prompt}\nGenerated text: {output['text']!r}")
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
