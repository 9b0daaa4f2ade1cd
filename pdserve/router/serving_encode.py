"""SGLang's `/encode` (embeddings) and `/classify` (reward / classification scores): `text` or
`input_ids`, one or a batch, in; `{"embedding": [...], "meta_info": {...}}` (a list for a batch)
out. For a reward model `embedding` holds the score head's logits, one per label."""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from pdserve.router.errors import bad_request
from pdserve.router.generate_result import encode_result
from pdserve.router.openai_models import EncodeRequest
from pdserve.router.openai_serving import check_model
from pdserve.router.router import Router
from pdserve.router.serving_embeddings import check_serves_pooling, prompts_of, run_pooled


async def encode(router: Router, request: Request, body: EncodeRequest, route: str) -> Response:
    started = time.monotonic()
    check_model(router.spec, body.model)
    check_serves_pooling(router.spec, route)
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("exactly one of text and input_ids is required", "text")
    param = "text" if body.text is not None else "input_ids"
    prompts, is_batch = prompts_of(getattr(body, param), param)
    choices = await run_pooled(router, request, prompts, param)
    items = [encode_result(c, time.monotonic() - started) for c in choices]
    return JSONResponse(items if is_batch else items[0])


def register_encode_routes(app: FastAPI, router: Router) -> None:
    @app.post("/encode")
    async def encode_route(body: EncodeRequest, request: Request) -> Response:
        return await encode(router, request, body, "/encode")

    @app.post("/classify")
    async def classify_route(body: EncodeRequest, request: Request) -> Response:
        return await encode(router, request, body, "/classify")
