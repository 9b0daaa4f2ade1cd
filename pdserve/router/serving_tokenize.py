"""`/tokenize` and `/detokenize` (also under `/v1/`), in vLLM's and SGLang's shapes.

The router holds no tokenizer, so each call is one question to a healthy tokenizer process
(`TokenizeReq` or `DetokenizeReq`), answered by rid with a `TokenizeOut`:

    POST /tokenize   {"model"?, "prompt": str | [str]  or  "messages": [...],
                      "add_special_tokens"?, "add_generation_prompt"?, "continue_final_message"?,
                      "return_token_strs"?}
                  -> {"tokens": [id...] | [[id...]...], "count": N | [N...], "max_model_len": M,
                      "token_strs"?: [...]}
    POST /detokenize {"model"?, "tokens": [id...] | [[id...]...], "skip_special_tokens"?}
                  -> {"text": str | [str...], "prompt": the same}  (SGLang's and vLLM's key)

A prompt's ids are those `/generate` and `/v1/completions` would use; messages are rendered by
the chat template and, as for chat completions, get no extra special tokens unless asked.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict

from pdserve.protocol import DetokenizeReq, TokenizeOut, TokenizeReq
from pdserve.router.errors import APIError, bad_request
from pdserve.router.openai_models import ChatMessage, RequestBody, TokenId
from pdserve.router.openai_serving import check_model, template_kwargs
from pdserve.router.router import Router

ANSWER_TIMEOUT_S = 30.0  # a tokenizer that does not answer by then is lost: 503


class TokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")  # a field not served is a 400 naming it

    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[TokenId] | list[list[TokenId]]
    skip_special_tokens: bool = True  # SGLang's default


def add_tokenize_routes(app: FastAPI, router: Router) -> None:
    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> Response:
        return JSONResponse(await tokenize(router, body))

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> Response:
        return JSONResponse(await detokenize(router, body))


async def tokenize(router: Router, body: TokenizeRequest) -> dict[str, Any]:
    check_model(router.spec, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    is_batch = isinstance(body.prompt, list)
    texts = None
    if body.prompt is not None:
        texts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if texts is not None:
        _check_sizes(router, [len(t) for t in texts])
    else:  # one prompt: all its messages' content
        chats = [m.to_template_dict()["content"] for m in body.messages or []]
        _check_sizes(router, [sum(len(c) for c in chats)])
    msg = TokenizeReq(
        rid=f"tok-{uuid.uuid4().hex}",
        texts=texts,
        messages=[m.to_template_dict() for m in body.messages] if body.messages else None,
        add_special_tokens=(
            body.add_special_tokens if body.add_special_tokens is not None else texts is not None
        ),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=template_kwargs(body.chat_template_kwargs),
        return_token_strs=body.return_token_strs,
    )
    out = await _ask(router, msg)
    result: dict[str, Any] = {
        "tokens": out.token_ids if is_batch else out.token_ids[0],
        "count": [len(ids) for ids in out.token_ids] if is_batch else len(out.token_ids[0]),
        "max_model_len": _max_model_len(router, out),
    }
    if body.return_token_strs and out.token_strs is not None:
        result["token_strs"] = out.token_strs if is_batch else out.token_strs[0]
    return result


async def detokenize(router: Router, body: DetokenizeRequest) -> dict[str, Any]:
    check_model(router.spec, body.model)
    is_batch = bool(body.tokens) and isinstance(body.tokens[0], list)
    token_ids: list[list[int]] = body.tokens if is_batch else [body.tokens]  # type: ignore[list-item]
    if len(token_ids) > router.spec.limits.max_prompts:
        raise bad_request(
            f"tokens holds {len(token_ids)} lists: expected at most "
            f"{router.spec.limits.max_prompts} (router.limits.max_prompts)",
            "tokens",
        )
    msg = DetokenizeReq(
        rid=f"detok-{uuid.uuid4().hex}",
        token_ids=token_ids,
        skip_special_tokens=body.skip_special_tokens,
    )
    out = await _ask(router, msg)
    text: str | list[str] = out.texts if is_batch else out.texts[0]
    return {"text": text, "prompt": text}


async def _ask(router: Router, msg: TokenizeReq | DetokenizeReq) -> TokenizeOut:
    """Send `msg` to a healthy tokenizer and wait for its answer; APIError for a refusal (400),
    no tokenizer or no answer (503)."""
    tokenizers = router.workers.healthy_tokenizers()
    if not router.is_started or not tokenizers:
        raise APIError("no healthy tokenizer", 503)
    tokenizer = tokenizers[hash(msg.rid) % len(tokenizers)]
    outbox = router.to_tokenizers[tokenizer.idx]
    try:
        out = await router.replies.ask(msg.rid, lambda: outbox.send(msg), ANSWER_TIMEOUT_S)
    except (ValueError, TypeError) as e:  # the codec refused a value (a lone surrogate)
        raise bad_request(f"the request could not be encoded: {e}") from None
    except TimeoutError:
        raise APIError(
            f"{tokenizer.name} did not answer within {ANSWER_TIMEOUT_S:g} s", 503
        ) from None
    if out.error is not None:
        param = "tokens" if isinstance(msg, DetokenizeReq) else None
        raise bad_request(out.error, param)
    return out


def _check_sizes(router: Router, prompt_chars: list[int]) -> None:
    """router.limits on the prompts of one /tokenize call: how many, and each one's characters."""
    limits = router.spec.limits
    if len(prompt_chars) > limits.max_prompts:
        raise bad_request(
            f"prompt holds {len(prompt_chars)} prompts: expected at most {limits.max_prompts} "
            "(router.limits.max_prompts)",
            "prompt",
        )
    if max(prompt_chars, default=0) > limits.max_prompt_chars:
        raise bad_request(
            f"a prompt has {max(prompt_chars)} characters: expected at most "
            f"{limits.max_prompt_chars} (router.limits.max_prompt_chars)",
            "prompt",
        )


def _max_model_len(router: Router, out: TokenizeOut) -> int | None:
    """The context length requests get: the smaller of the router's and the model's (None when
    neither is known)."""
    limits = [n for n in (router.spec.max_context_len, out.max_context_len) if n > 0]
    return min(limits, default=None)
