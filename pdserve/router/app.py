"""The FastAPI app: routes of the OpenAI and native APIs over one `Router`, bearer auth, errors.

`build_app(router)` starts the router in the app's lifespan (unless it was started already), so a
test can run the app under uvicorn in a thread, or start the router itself and use ASGITransport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pdserve
from pdserve.config.sampling_params import SamplingParams
from pdserve.env import vertex_env
from pdserve.protocol import GenerateReq
from pdserve.router.errors import APIError, install_error_handlers
from pdserve.router.group_reader import ClientGone, collect, failure_of
from pdserve.router.lora_adapters import register_lora_routes
from pdserve.router.openai_models import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
)
from pdserve.router.platform_routes import register_platform_routes
from pdserve.router.router import Router
from pdserve.router.serving_chat import create_chat_completion
from pdserve.router.serving_completions import create_completion
from pdserve.router.serving_embeddings import is_embedding_model, register_embedding_routes
from pdserve.router.serving_generate import generate
from pdserve.router.serving_responses import ResponsesRequest, create_response
from pdserve.router.serving_tokenize import add_tokenize_routes

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
UPLOAD_PATHS = frozenset({"/v1/files"})  # BodyLimit-free: router.max_file_bytes applies
_CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it


class BearerAuth:
    """`Authorization: Bearer <api_key>` on every route but /health (pure ASGI: streams untouched).
    The scheme is case-insensitive (RFC 7235); the key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        is_key = secrets.compare_digest(token.strip(b" "), self.expected)
        if is_key and scheme.lower() == b"bearer":
            await self.app(scope, receive, send)
            return
        err = APIError("Incorrect API key provided.", 401, code="invalid_api_key")
        await err.response()(scope, receive, send)


class BodyLimit:
    """413 with OpenAI's error body for a request body over `max_bytes`: at once when the
    Content-Length says so, else as soon as the streamed (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > self.max_bytes:  # an HTTPException passes FastAPI's body reader
                raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            f"the request body is larger than {self.max_bytes} bytes (router.limits.max_body_bytes)",
            413,
            code="request_too_large",
        )


def build_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        started_here = not router.is_started
        if started_here:
            await router.start()
        yield
        if started_here:
            await router.stop()

    app = FastAPI(title="pdserve", version=pdserve.__version__, lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=_CLIENT_CLOSED)

    _add_generation_routes(app, router)
    _add_control_routes(app, router)
    _add_info_routes(app, router)
    add_tokenize_routes(app, router)
    register_platform_routes(app, router)
    register_embedding_routes(app, router)
    register_lora_routes(app, lambda: router.lora)
    app.add_middleware(BodyLimit, max_bytes=router.spec.limits.max_body_bytes)
    if router.spec.api_key:
        # Vertex AI probes its health route without credentials, as load balancers probe /health.
        health = vertex_env().health_route
        open_paths = OPEN_PATHS | {health} if health else OPEN_PATHS
        app.add_middleware(BearerAuth, api_key=router.spec.api_key, open_paths=open_paths)
    return app


def _add_generation_routes(app: FastAPI, router: Router) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(router, request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(router, request, body)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(router, request, body)

    @app.post("/generate")
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(router, request, body)


def _add_control_routes(app: FastAPI, router: Router) -> None:
    @app.get("/health")
    async def health() -> Response:
        is_ready, body = router.health()  # every tokenizer and worker, by name
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        message = await _run_health_request(router)
        if message is None:
            return JSONResponse({"status": "ok"})
        return APIError(f"health generation failed: {message}", 503).response()

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> Response:
        if body.abort_all:
            num = router.abort_all()
        elif body.rid:
            num = router.abort(body.rid)
        else:
            raise APIError("give rid or abort_all=true", 400, param="rid")
        return JSONResponse({"success": True, "num_aborted": num})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        num = router.flush_cache()
        return PlainTextResponse(f"Cache flushed on {num} worker(s).\n")


def _add_info_routes(app: FastAPI, router: Router) -> None:
    spec = router.spec
    created = int(time.time())

    def cards() -> list[dict[str, Any]]:
        """The served model's card, then each loaded adapter's."""
        card = {
            "id": spec.model_name,
            "object": "model",
            "created": created,
            "owned_by": "pdserve",
            "root": spec.model_path,
            "max_model_len": spec.max_context_len or None,
        }
        return [card, *router.lora.model_cards(created)]

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        """OpenAI's retrieve: the card of the served model or of a loaded adapter, else 404."""
        for card in cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        message = f"The model `{model_id}` does not exist."
        raise APIError(message, 404, param="model", code="model_not_found")

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": pdserve.__version__})

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> Response:
        info = {
            "model_path": spec.model_path,
            "tokenizer_path": spec.tokenizer_path_or_model,
            "is_generation": not is_embedding_model(spec),
            "served_model_name": spec.model_name,
        }
        return JSONResponse(info)

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        return JSONResponse({**router.server_info(), "version": pdserve.__version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _health_request(router: Router, rid: str) -> GenerateReq:
    """One generated token; an embedding model cannot generate, so for it one pooled forward."""
    if is_embedding_model(router.spec):
        sampling = SamplingParams(max_new_tokens=0).to_dict()
        return GenerateReq(rid=rid, sampling=sampling, text="Hello", embed=True)
    sampling = SamplingParams(max_new_tokens=1, temperature=0.0).to_dict()
    return GenerateReq(rid=rid, sampling=sampling, text="Hello")


async def _run_health_request(router: Router) -> str | None:
    """Run `_health_request` through tokenizer, prefill and decode; None when it worked."""
    if not router.can_serve():
        return "no healthy route (workers starting or lost)"
    rid = f"health-{uuid.uuid4().hex}"
    req = _health_request(router, rid)
    try:
        group = router.submit(rid, [req])
    except APIError as e:
        return e.message
    try:
        choices = await asyncio.wait_for(
            collect(group), timeout=router.spec.health_generate_timeout_s
        )
    except TimeoutError:
        return f"no answer within {router.spec.health_generate_timeout_s:g} s"
    finally:
        router.cancel(group, "health check over")
    err = failure_of(choices[0].final_output())
    if err is not None:
        return err.message
    if req.embed and choices[0].embedding is None:
        return "the encode ended without an embedding"
    return None
