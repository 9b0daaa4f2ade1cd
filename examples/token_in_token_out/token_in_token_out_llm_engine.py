"""Token in, token out with the offline Engine: give `input_ids`, read `output_ids`
(SGLang's token_in_token_out/token_in_token_out_llm_engine.py).

Usage:
    python examples/token_in_token_out/token_in_token_out_llm_engine.py     # tiny offline model
    python examples/token_in_token_out/token_in_token_out_llm_engine.py --model /models/Llama-3.2-1B
    python examples/token_in_token_out/token_in_token_out_llm_engine.py --device cpu --in-process

Without --model it builds pdserve's tiny random-weight model (a few seconds, offline).
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

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
    model_path = args.model or tiny_model()

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = {"temperature": 0.8, "top_p": 0.95}

    # Tokenize here; the engine only sees token ids and answers with token ids.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    token_ids_list = [tokenizer.encode(prompt) for prompt in prompts]

    llm = pdserve.Engine(model_path=model_path, device=args.device, in_process=args.in_process)
    outputs = llm.generate(input_ids=token_ids_list, sampling_params=sampling_params)
    for input_ids, output in zip(token_ids_list, outputs):
        print("===============================")
        print(f"Input: {input_ids}\nGenerated token ids: {output['output_ids']}")
        # Decode them yourself when you need text:
        # print(tokenizer.decode(output["output_ids"], skip_special_tokens=True))
    llm.shutdown()


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
