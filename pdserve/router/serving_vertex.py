"""Vertex AI's prediction shapes over native `/generate`: `{"instances": [{"text": ...}, ...],
"parameters": {"sampling_params": {...}, ...}}` -> `{"predictions": [<one /generate result per
instance>]}`, as SGLang serves them. Vertex AI's custom containers are told their routes and port
by `AIP_*` variables (`pdserve.env.VertexEnv`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from pdserve.env import VertexEnv
from pdserve.router.errors import bad_request
from pdserve.router.openai_models import GenerateRequest
from pdserve.router.router import Router
from pdserve.router.serving_generate import generate

PROMPT_KEYS = ("text", "input_ids")


class VertexRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instances: list[dict[str, Any]]
    parameters: dict[str, Any] | None = None


def to_generate_request(body: VertexRequest) -> GenerateRequest:
    """One /generate batch: each instance's prompt, with the parameters applied to all."""
    key = next((k for k in PROMPT_KEYS if any(k in i for i in body.instances)), None)
    if key is None:
        raise bad_request(f"each instance needs one of {list(PROMPT_KEYS)}", "instances")
    missing = [n for n, i in enumerate(body.instances) if i.get(key) is None]
    if missing:
        raise bad_request(f"instances {missing} have no {key!r}", "instances")
    params = dict(body.parameters or {})
    if params.get("stream"):
        raise bad_request("stream is not supported by Vertex AI predictions", "stream")
    fields: dict[str, Any] = {**params, key: [i[key] for i in body.instances]}
    images = [i.get("image_data") for i in body.instances]
    if any(image is not None for image in images):
        fields["image_data"] = images
    try:
        return GenerateRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def add_vertex_routes(app: FastAPI, router: Router, vertex: VertexEnv) -> None:
    """`/vertex_generate`, and Vertex AI's predict and health routes where it names them. The
    health route is an alias of `/health`, which must be registered already."""

    async def vertex_generate(body: VertexRequest, request: Request) -> Response:
        if not body.instances:
            return JSONResponse({"predictions": []})
        response = await generate(router, request, to_generate_request(body))
        predictions = json.loads(bytes(response.body))
        return JSONResponse({"predictions": predictions})

    for route in dict.fromkeys(["/vertex_generate", vertex.predict_route]):
        app.add_api_route(route, vertex_generate, methods=["POST"])
    if vertex.health_route and vertex.health_route != "/health":
        health = next((r for r in app.routes if getattr(r, "path", None) == "/health"), None)
        if health is None:
            raise RuntimeError("AIP_HEALTH_ROUTE: register /health before the Vertex AI routes")
        app.add_api_route(vertex.health_route, health.endpoint, methods=["GET"])  # type: ignore[attr-defined]
