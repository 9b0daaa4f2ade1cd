"""Hidden states over HTTP: `POST /generate` with `return_hidden_states: true`; the vectors are in
`meta_info["hidden_states"]` (SGLang's hidden_states_server.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/hidden_states/hidden_states_server.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/hidden_states/hidden_states_server.py --launch --device cpu
"""

from __future__ import annotations

import argparse

import httpx
import torch

from pdserve.entrypoints.example_server import add_server_args, example_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    args = parser.parse_args()

    prompts = ["Hello, my name is", "The president of the United States is"]
    sampling_params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 10}
    body = {"text": prompts, "sampling_params": sampling_params, "return_hidden_states": True}
    with example_server(args) as base_url:
        response = httpx.post(f"{base_url}/generate", json=body, timeout=120)
        response.raise_for_status()
        for prompt, output in zip(prompts, response.json()):
            meta = output["meta_info"]
            parts = [torch.tensor(h, dtype=torch.float32) for h in meta["hidden_states"]]
            hidden = torch.cat([p.unsqueeze(0) if p.dim() == 1 else p for p in parts], dim=0)
            print("===============================")
            print(f"Prompt: {prompt}\nGenerated text: {output['text']!r}")
            print(f"Prompt_Tokens: {meta['prompt_tokens']}\t"
                  f"Completion_tokens: {meta['completion_tokens']}")  # fmt: skip
            print(f"Hidden states: {tuple(hidden.shape)}")
            print(hidden)


if __name__ == "__main__":
    main()
