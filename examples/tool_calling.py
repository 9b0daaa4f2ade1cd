"""Tool calling: the model calls a declared function (OpenAI's `tools`), the caller runs it and
sends the result back in a `tool` message, and the model answers.

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/tool_calling.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/tool_calling.py --launch --device cpu

`tool_choice="required"` holds the output to calls of the declared tools, so even pdserve's tiny
random-weight model (built when no --model is given) makes a valid call; with a real model, leave
tool_choice out ("auto") and the model decides, in its own format (Qwen, Llama 3.1+, Mistral).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import openai

from pdserve.entrypoints.example_server import add_server_args, example_server

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo", "Lima"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    }
]


def get_weather(city: str, days: int) -> dict[str, Any]:
    return {"city": city, "forecast": ["sunny"] * days}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--tool-choice", default="required", help="required, auto or none")
    args = parser.parse_args()

    with example_server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        messages: list[Any] = [{"role": "user", "content": "Will it rain in Oslo this week?"}]
        response = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=args.tool_choice,
            parallel_tool_calls=False, temperature=0.7, max_tokens=400,
        )  # fmt: skip
        message = response.choices[0].message
        if not message.tool_calls:
            print(f"No call; the answer: {message.content}")
            return
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)
            print(f"Call: {call.function.name}({json.dumps(arguments)})")
            result = get_weather(**arguments)
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
            )
        answer = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=40
        )
        print(f"Answer: {answer.choices[0].message.content}")


if __name__ == "__main__":
    main()
