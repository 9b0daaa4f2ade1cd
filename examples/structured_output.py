"""Structured output: a JSON object matching a schema through OpenAI's `response_format`, text
matching a regular expression through SGLang's `/generate` (`sampling_params.regex`), and a
structural tag (an answer wrapped in a tag, its content JSON matching a schema).

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/structured_output.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/structured_output.py --launch --device cpu

With --launch, --model is the model served; without --model it builds pdserve's tiny
random-weight model (a few seconds, offline): the values are nonsense, but always valid.
"""

from __future__ import annotations

import argparse
import json

import httpx
import openai

from pdserve.entrypoints.example_server import add_server_args, example_server

PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
        "color": {"enum": ["black", "white", "red"]},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "in_stock": {"type": "boolean"},
    },
    "required": ["name", "color", "price"],
}
DESCRIPTION = (
    "The SmartHome Mini is a compact smart home assistant available in black or white for only "
    "$49.99. Give its name, color, price and whether it is in stock as JSON."
)
DATE_REGEX = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
# xgrammar's structural tag format: "<price>", JSON matching the schema, "</price>". SGLang's shape,
# {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]},
# leaves the text free until a trigger opens one of the tags.
PRICE_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "tag",
        "begin": "<price>",
        "content": {"type": "json_schema", "json_schema": {
            "type": "object", "properties": {"usd": {"type": "number", "minimum": 0}},
            "required": ["usd"], "additionalProperties": False,
        }},
        "end": "</price>",
    },
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    args = parser.parse_args()

    with example_server(args) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
        model = client.models.list().data[0].id  # the served model's name
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": DESCRIPTION}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA, "strict": True},
            },
            temperature=0.7,
            max_tokens=400,
        )
        product = json.loads(response.choices[0].message.content or "")
        print(f"Product: {json.dumps(product)}")

        body = {
            "text": "The launch date, as YYYY-MM-DD:",
            "sampling_params": {"regex": DATE_REGEX, "max_new_tokens": 16, "temperature": 0.7},
        }
        result = httpx.post(f"{base_url}/generate", json=body, timeout=60).json()
        print(f"Date: {result['text']}")

        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": DESCRIPTION + " Give only the price."}],
            response_format=PRICE_TAG,  # type: ignore[arg-type]
            temperature=0.7,
            max_tokens=100,
        )
        print(f"Tagged: {response.choices[0].message.content}")


if __name__ == "__main__":
    main()
