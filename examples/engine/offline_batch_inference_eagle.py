"""Speculative decoding with an EAGLE draft head in the offline Engine (SGLang's
engine/offline_batch_inference_eagle.py).

Usage:
    python examples/engine/offline_batch_inference_eagle.py        # tiny model + random head
    python examples/engine/offline_batch_inference_eagle.py \
        --model /models/Llama-3.1-8B-Instruct \
        --draft-model /models/sglang-EAGLE-LLaMA3-Instruct-8B
    python examples/engine/offline_batch_inference_eagle.py --device cpu --in-process

Without --model it builds pdserve's tiny random-weight model and a random EAGLE head for it
(`pdserve tiny-model DIR --eagle`), so the text is gibberish and few drafts are accepted; the
output is still exactly the non-speculative greedy output.
"""

from __future__ import annotations

import argparse
import tempfile

import pdserve


def tiny_model_and_head(head_dir: str) -> tuple[str, str]:
    """The tiny model of `pdserve demo` and a draft head for it (random weights)."""
    from pdserve.tiny_model import cached_tiny_model
    from pdserve.tiny_model.eagle import build_tiny_eagle_head

    return str(cached_tiny_model()), str(build_tiny_eagle_head(head_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
    parser.add_argument("--draft-model", help="its EAGLE-2 head (needed with --model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--in-process", action="store_true", help="run the engine core in this process"
    )
    args = parser.parse_args()
    if args.model and not args.draft_model:
        parser.error("--model needs --draft-model (an EAGLE-2 head for it)")

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = {"temperature": 0, "max_new_tokens": 30}

    with tempfile.TemporaryDirectory() as head_dir:
        model, draft = args.model, args.draft_model
        if model is None:
            model, draft = tiny_model_and_head(head_dir)
        llm = pdserve.Engine(
            model_path=model,
            speculative_algorithm="EAGLE",
            speculative_draft_model_path=draft,
            speculative_num_steps=3,
            speculative_eagle_topk=4,  # a tree: 4 candidates a step; 1 drafts a chain
            speculative_num_draft_tokens=16,
            device=args.device,
            in_process=args.in_process,
        )
        outputs = llm.generate(prompts, sampling_params)
        for prompt, output in zip(prompts, outputs):
            meta = output["meta_info"]
            per_step = meta["completion_tokens"] / max(meta.get("spec_verify_ct", 0), 1)
            print("===============================")
            print(f"Prompt: {prompt}\nGenerated text: {output['text']!r}")
            print(f"Tokens per verify step: {per_step:.2f}")
        llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
