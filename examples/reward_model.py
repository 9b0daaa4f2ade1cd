"""Scores from a reward model: chat-templated conversations to `POST /classify`, one
`{"embedding": [score, ...], "meta_info"}` per conversation (SGLang's reward_model.py).

Usage:
    # against a running server of a reward model:
    pdserve launch --model /models/Skywork-Reward-Llama-3.1-8B-v0.2 --is-embedding
    python examples/reward_model.py --base-url http://127.0.0.1:8000 --model PATH
    # or start a prefill + decode server of the model for the duration of the script:
    python examples/reward_model.py --launch --device cpu

--model is the tokenizer (and, with --launch, the model served). Without --model it builds a tiny
random-weight reward model (a few seconds, offline), so the scores are noise.
"""

from __future__ import annotations

import argparse

import httpx
from transformers import AutoTokenizer

from pdserve.entrypoints.example_server import add_server_args, example_server

PROMPT = "What is the range of the numeric output of a sigmoid node in a neural network?"
RESPONSE1 = "The output of a sigmoid node is bounded between -1 and 1."
RESPONSE2 = "The output of a sigmoid node is bounded between 0 and 1."


def tiny_model() -> str:
    """A tiny reward model, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model.pooling_models import cached_tiny_pooling_model

    return str(cached_tiny_pooling_model("reward"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser, model_help="a reward model directory (default: tiny model)")
    args = parser.parse_args()
    model_path = args.model or tiny_model()

    convs = [
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE1}],
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE2}],
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = tokenizer.apply_chat_template(convs, tokenize=False)

    with example_server(args, model=model_path, is_embedding=True) as url:
        response = httpx.post(f"{url}/classify", json={"text": prompts}, timeout=60)
        response.raise_for_status()
        for conv, result in zip(convs, response.json()):
            print(f"Response: {conv[-1]['content']!r}")
            print(f"reward: {result['embedding'][0]}")


if __name__ == "__main__":
    main()
