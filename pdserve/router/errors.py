"""OpenAI's error body for every failure the router reports, and the FastAPI handlers that send it."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A failure to answer with `status` and OpenAI's error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | int | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code if code is not None else status
        self.err_type = err_type or default_error_type(status)
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def default_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


MAX_MESSAGE_CHARS = 2000


def safe_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text that JSON-encodes as UTF-8 whatever the client sent (a lone surrogate comes back
    escaped) and stays short (a message may quote a huge value)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    if param is not None:
        param = safe_text(param, 200)
    err = {"message": safe_text(message), "type": err_type, "param": param, "code": code}
    return {"error": err}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


_PARAM_IN_MESSAGE = re.compile(r"^(\w+)=")
_SAMPLING_TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


_PARAM_LEADING = re.compile(r"^(\w+)(?:=|\[| has )")


def tokenizer_error(message: str) -> APIError:
    """A tokenizer's refusal (a token id out of the vocabulary, a prompt too long) as a 400,
    naming the parameter when the message starts with it (`stop_token_ids=...`)."""
    match = _PARAM_LEADING.match(message)
    param = match.group(1) if match else None
    return APIError(message, 400, param=_SAMPLING_TO_OPENAI.get(param, param) if param else None)


def sampling_error(err: ValueError, openai_names: bool = True) -> APIError:
    """A `SamplingParams` ValueError as a 400 naming the parameter where the message does."""
    message = str(err)
    match = _PARAM_IN_MESSAGE.match(message)
    param = match.group(1) if match else None
    if param and openai_names:
        param = _SAMPLING_TO_OPENAI.get(param, param)
    return APIError(message, 400, param=param)


_UNION_TAGS = re.compile(r"^(str|int|float|bool|dict|list|none|constrained-\w+)$|\[")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return f"malformed JSON body: {errors[0].get('msg', '')}", None
    field = errors[0].get("loc", ("", ""))[1:2]
    same_field = [e for e in errors if e.get("loc", ("", ""))[1:2] == field]
    # For a union (prompt: str | list[int] | ...) the telling error is a value's (not a type
    # mismatch of another member), the deepest one.
    first = max(
        same_field,
        key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(e.get("loc", ()))),
    )
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the top-level field, as OpenAI's `param`
    msg = first.get("msg", "invalid value")
    if len(same_field) > 1 and len(same_field) == len(errors):
        msg = f"{msg} (the value matches none of the accepted types)"  # a union's members
    elif len(errors) > len(same_field):
        msg += f" (and errors in {len(errors) - len(same_field)} more place(s))"
    where = ".".join(p for p in loc if not _UNION_TAGS.search(p))
    return (f"{where}: {msg}" if where else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(message, 400, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(str(exc.detail), exc.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return APIError(f"internal error: {type(exc).__name__}: {exc}", 500).response()
