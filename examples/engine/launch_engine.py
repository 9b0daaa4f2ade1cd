"""Launch the offline Engine, generate once, shut it down (SGLang's engine/launch_engine.py).

Usage:
    python examples/engine/launch_engine.py                        # tiny offline model
    python examples/engine/launch_engine.py --model /models/Llama-3.2-1B-Instruct
    python examples/engine/launch_engine.py --device cpu --in-process

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

    llm = pdserve.Engine(
        model_path=args.model or tiny_model(), device=args.device, in_process=args.in_process
    )
    output = llm.generate("What is the capital of France?")
    print(f"Generated text: {output['text']!r}")
    print(f"Finish reason: {output['meta_info']['finish_reason']}")
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
