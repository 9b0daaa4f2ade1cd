"""Prefill the assistant's answer: the last message is the assistant's partial reply, and
`continue_final_message` makes the model continue it instead of starting a new turn
(SGLang's openai_chat_with_response_prefill.py).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/openai_chat_with_response_prefill.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/openai_chat_with_response_prefill.py --launch --device cpu

With --launch, --model is the model served; without --model it builds pdserve's tiny
random-weight model (a few seconds, offline), so the continuation is gibberish.
"""

from __future__ import annotations

import argparse

import openai

from pdserve.entrypoints.example_server import add_server_args, example_server

DESCRIPTION = """
Extract the name, size, price, and color from this product description as a JSON object:

<description>
The SmartHome Mini is a compact smart home assistant available in black or white for only $49.99.
At just 5 inches wide, it lets you control lights, thermostats, and other connected devices via
voice or app, no matter where you place it in your home.
</description>
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    args = parser.parse_args()

    with example_server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        prefill = "{\n"
        response = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": "You are a helpful AI assistant"},
                {"role": "user", "content": DESCRIPTION},
                {"role": "assistant", "content": prefill},  # the answer starts like this
            ],
            temperature=0,
            max_tokens=64,
            extra_body={"continue_final_message": True},
        )

    # The response holds the continuation only: the full answer is prefill + continuation.
    print(f"Continuation: {response.choices[0].message.content!r}")
    print(f"Full answer:\n{prefill}{response.choices[0].message.content}")


if __name__ == "__main__":
    main()
