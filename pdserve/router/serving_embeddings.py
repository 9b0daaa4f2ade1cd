"""Embeddings and scores (issue 11): OpenAI's `/v1/embeddings`, and what SGLang's `/encode` and
`/classify` (`serving_encode.py`) share with it: running pooled requests, and the 400s that keep
an embedding model off the generation routes and a generation model off these.

A pooled request takes the generation path with decoding left out: router → tokenizer → decode
worker (passes it on, reserves nothing) → prefill worker (one forward pass, pooled or scored) →
tokenizer → router; a mixed worker answers it in place.
"""

from __future__ import annotations

import base64
import functools
import math
import struct
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.config.engine_config import ModelConfig
from pdserve.config.router_spec import RouterSpec
from pdserve.config.sampling_params import SamplingParams
from pdserve.router.admission import admit, build_checked
from pdserve.router.choice_state import ChoiceState
from pdserve.router.embedding_inputs import is_multimodal_input, multimodal_prompts
from pdserve.router.errors import APIError, bad_request
from pdserve.router.group_reader import run_to_end
from pdserve.router.openai_models import EmbeddingRequest
from pdserve.router.openai_serving import Prompt, check_model, fan_out, truncation
from pdserve.router.router import Router

# Routes that generate text: an embedding model refuses them with a 400.
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/generate", "/vertex_generate"}
)
_POOLED_SAMPLING = SamplingParams(max_new_tokens=0).to_dict()  # one forward pass, no token


def is_embedding_model(spec: RouterSpec) -> bool:
    """Whether the served model is an embedding / reward model (the resolved topology says)."""
    return bool(spec.topology.get("is_embedding"))


@functools.lru_cache(maxsize=4)
def pooling_config(model_path: str) -> ModelConfig:
    """The served model's pooling settings (normalize, Matryoshka sizes), read from its dir."""
    return ModelConfig.from_hf(model_path, is_embedding=True)


def check_serves_pooling(spec: RouterSpec, route: str) -> None:
    if not is_embedding_model(spec):
        raise bad_request(
            f"{route} needs an embedding or reward model: the served model `{spec.model_name}` "
            "is a generation model (launch an embedding model with --is-embedding)",
            "model",
        )


def prompts_of(value: Any, param: str) -> tuple[list[Prompt], bool]:
    """The prompts of a str | [str] | [id] | [[id]] input, and whether it was a batch."""
    if value is None:
        raise bad_request(f"{param} is required", param)
    if isinstance(value, str):
        items, is_batch = [value], False
    elif value and all(isinstance(t, int) for t in value):
        items, is_batch = [list(value)], False
    else:
        items, is_batch = list(value), True
    if not items or any(len(item) == 0 for item in items):
        raise bad_request(f"{param} must not be empty (nor hold an empty item)", param)
    prompts = [Prompt(text=p) if isinstance(p, str) else Prompt(input_ids=list(p)) for p in items]
    return prompts, is_batch


async def run_pooled(
    router: Router,
    request: Request,
    prompts: list[Prompt],
    param: str,
    images: list[list[str] | None] | None = None,
    truncate: int = 0,
) -> list[ChoiceState]:
    """Run one pooled request per prompt (each its own route) to the end; APIError if any
    failed. Every choice holds its `embedding`. `images`: per prompt, for chat prompts whose
    last (assistant) turn stays open (multimodal embeddings, `embedding_inputs.py`). `truncate`:
    GenerateReq.truncate_prompt_tokens."""
    fields: dict[str, Any] = {"truncate_prompt_tokens": truncate}
    if images:
        fields.update(continue_final_message=True, add_generation_prompt=False)
    fan = build_checked(lambda: fan_out(prompts, [_POOLED_SAMPLING], embed=True, **fields))
    for req, urls in zip(fan.reqs, images or []):
        req.image_data = urls
    admit(router, fan, param)
    group = router.submit(fan.group_id, fan.reqs, fan.route_keys)
    choices = await run_to_end(router, request, group)
    for c in choices:
        if c.embedding is None:
            raise APIError(f"request {c.rid} ended without an embedding", 500)
    return choices


def truncated(vector: list[float], dims: int | None, normalize: bool) -> list[float]:
    """The first `dims` values (Matryoshka), L2-normalized again when the model normalizes."""
    if dims is None or dims >= len(vector):
        return vector
    head = vector[:dims]
    if not normalize:
        return head
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def check_dimensions(spec: RouterSpec, dims: int | None) -> None:
    """400 unless the model can give `dims` values (its full size, or a Matryoshka size)."""
    if dims is None:
        return
    config = pooling_config(spec.model_path)
    full = config.num_labels or config.hidden_size
    if dims == full or dims in config.matryoshka_dims:
        return
    if config.matryoshka_dims:
        expected = f"one of {list(config.matryoshka_dims)} or {full}"
    else:
        expected = f"{full} (the model does not support Matryoshka truncation)"
    raise bad_request(f"dimensions={dims} is not supported by this model: expected {expected}",
                      "dimensions")  # fmt: skip


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embeddings(router: Router, request: Request, body: EmbeddingRequest) -> Response:
    spec = router.spec
    check_model(spec, body.model)
    check_serves_pooling(spec, "/v1/embeddings")
    check_dimensions(spec, body.dimensions)
    images = None
    if is_multimodal_input(body.input):
        prompts, images = multimodal_prompts(body.input)  # type: ignore[arg-type]
    else:
        prompts, _ = prompts_of(body.input, "input")
    truncate = truncation(body.truncate_prompt_tokens)
    choices = await run_pooled(router, request, prompts, "input", images, truncate)
    normalize = body.dimensions is not None and pooling_config(spec.model_path).normalize
    data = []
    for c in choices:
        vector = truncated(c.embedding or [], body.dimensions, normalize)
        shaped: Any = encode_base64(vector) if body.encoding_format == "base64" else vector
        data.append({"object": "embedding", "embedding": shaped, "index": c.index})
    num_tokens = sum(c.prompt_tokens for c in choices)
    usage = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    return JSONResponse({"object": "list", "data": data, "model": spec.model_name, "usage": usage})


class GenerationGuard:
    """An embedding model answers the generation routes with a 400 before any work is done
    (inside the auth middleware, so an unauthenticated client still gets its 401)."""

    def __init__(self, app: ASGIApp, spec: RouterSpec) -> None:
        self.app = app
        self.spec = spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in GENERATION_PATHS:
            if is_embedding_model(self.spec):
                err = bad_request(
                    f"{scope['path']} needs a generation model: the served model "
                    f"`{self.spec.model_name}` is an embedding/reward model (it serves "
                    "/v1/embeddings, /encode and /classify)",
                    "model",
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def register_embedding_routes(app: FastAPI, router: Router) -> None:
    """`/v1/embeddings`, `/encode`, `/classify`, and the guard of the generation routes."""
    from pdserve.router.serving_encode import register_encode_routes

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await create_embeddings(router, request, body)

    register_encode_routes(app, router)
    app.add_middleware(GenerationGuard, spec=router.spec)
