"""The request and response shapes of Vertex AI's online prediction route, against a local server
(SGLang's vertex_predict.py): `POST /vertex_generate` with `{"instances": [...], "parameters":
{...}}` answers `{"predictions": [...]}`, one native /generate result per instance.

Usage:
    # against a running server (`pdserve launch --model PATH` or `pdserve demo`):
    python examples/vertex_predict.py --base-url http://127.0.0.1:8000
    # or start a prefill + decode server for the duration of the script:
    python examples/vertex_predict.py --launch --device cpu

Deployed as a Vertex AI custom container, the server listens on $AIP_HTTP_PORT and serves
predictions on $AIP_PREDICT_ROUTE and health on $AIP_HEALTH_ROUTE as well (start it with
`pdserve launch --model PATH --host 0.0.0.0`), and the Vertex AI SDK sends the same body:

    response = endpoint.predict(
        instances=[{"text": "The capital of France is"}, {"text": "What is a car?"}],
        parameters={"sampling_params": {"max_new_tokens": 16}},
    )
    print(response.predictions)

With --launch, --model is the model served; without --model it builds pdserve's tiny
random-weight model (a few seconds, offline), so the predictions are gibberish.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import httpx

from pdserve.entrypoints.example_server import add_server_args, example_server


@dataclass
class VertexPrediction:
    predictions: list[dict[str, Any]]


class LocalVertexEndpoint:
    """What `aiplatform.Endpoint.predict` does, against a local server."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url + os.environ.get("AIP_PREDICT_ROUTE", "/vertex_generate")

    def predict(
        self, instances: list[dict[str, Any]], parameters: dict[str, Any] | None = None
    ) -> VertexPrediction:
        body = {"instances": instances, "parameters": parameters}
        response = httpx.post(self.url, json=body, timeout=300)
        response.raise_for_status()
        return VertexPrediction(predictions=response.json()["predictions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    parameters = {"sampling_params": {"max_new_tokens": args.max_new_tokens}}

    with example_server(args) as base_url:
        endpoint = LocalVertexEndpoint(base_url)
        # Predict with a single prompt.
        response = endpoint.predict([{"text": "The capital of France is"}], parameters)
        print(response.predictions)
        # Predict with multiple prompts and parameters.
        response = endpoint.predict(
            instances=[{"text": "The capital of France is"}, {"text": "What is a car?"}],
            parameters=parameters,
        )
        print(response.predictions)
    for prediction in response.predictions:
        print(f"Prediction: {prediction['text']!r} ({prediction['meta_info']['finish_reason']})")


if __name__ == "__main__":
    main()
