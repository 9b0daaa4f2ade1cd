"""Hidden states with the offline Engine: `generate(..., return_hidden_states=True)` puts the
final-layer hidden states (after the last norm) in `meta_info["hidden_states"]`: the prompt's
rows first, then one row per generated token fed back (SGLang's hidden_states_engine.py).

Usage:
    python examples/hidden_states/hidden_states_engine.py               # tiny offline model
    python examples/hidden_states/hidden_states_engine.py --model /models/Llama-3.2-1B-Instruct
    python examples/hidden_states/hidden_states_engine.py --device cpu --in-process
"""

from __future__ import annotations

import argparse

import torch

import pdserve


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


def stacked(hidden_states: list) -> torch.Tensor:
    """[prompt rows..., one row per output] as one [num_tokens, hidden] tensor."""
    parts = [torch.tensor(h, dtype=torch.float32) for h in hidden_states]
    return torch.cat([p.unsqueeze(0) if p.dim() == 1 else p for p in parts], dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--in-process", action="store_true", help="run the engine core in this process"
    )
    args = parser.parse_args()

    prompts = ["Hello, my name is", "The president of the United States is"]
    sampling_params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 10}
    llm = pdserve.Engine(
        model_path=args.model or tiny_model(), device=args.device, in_process=args.in_process
    )
    outputs = llm.generate(prompts, sampling_params=sampling_params, return_hidden_states=True)
    for prompt, output in zip(prompts, outputs):
        meta = output["meta_info"]
        print("===============================")
        print(f"Prompt: {prompt}\nGenerated text: {output['text']!r}")
        print(
            f"Prompt_Tokens: {meta['prompt_tokens']}\tCompletion_tokens: {meta['completion_tokens']}"
        )
        hidden = stacked(meta["hidden_states"])
        print(f"Hidden states: {tuple(hidden.shape)}")
        print(hidden)
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
