"""One batch input line answered through the same serving function as an online request, so its
body is shaped (and refused) exactly as `POST /v1/chat/completions` or `/v1/completions` would.

Differences from an online request: every sub-request carries `BATCH_PRIORITY`, so workers can
schedule online traffic first; a busy (429) or not-ready (503) router is waited out instead of
answered; and the "client" disconnects only when the batch is cancelled (`ClientGone`: the line
stays unanswered).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from pdserve.protocol import GenerateReq
from pdserve.router.batch_input import InputLine
from pdserve.router.errors import APIError, bad_request
from pdserve.router.group_reader import ClientGone
from pdserve.router.openai_models import ChatCompletionRequest, CompletionRequest
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router
from pdserve.router.serving_chat import create_chat_completion
from pdserve.router.serving_completions import create_completion

logger = logging.getLogger(__name__)

BATCH_PRIORITY = -1  # GenerateReq.priority of a batch line; online requests have 0
RETRY_STATUSES = (429, 503)  # the router is full or has no route yet: wait, then try again
RETRY_S = 0.5

Serve = Callable[[Router, Request, Any], Awaitable[Response]]
ENDPOINTS: dict[str, tuple[type[BaseModel], Serve]] = {
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/completions": (CompletionRequest, create_completion),
}


class LineAnswer(NamedTuple):
    status_code: int
    body: dict[str, Any]  # the endpoint's response body, or OpenAI's error body

    @classmethod
    def of_error(cls, err: APIError) -> LineAnswer:
        return cls(err.status, err.body())

    @property
    def is_error(self) -> bool:
        return self.status_code != 200


class BatchRouter:
    """The router as a batch line's serving function sees it: every sub-request it submits
    carries `priority`. Everything else is the real router's."""

    def __init__(self, router: Router, priority: int = BATCH_PRIORITY) -> None:
        self._router = router
        self._priority = priority

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router, name)

    def submit(
        self, group_id: str, reqs: list[GenerateReq], route_keys: list[int] | None = None
    ) -> RequestGroup:
        for req in reqs:
            req.priority = self._priority
        return self._router.submit(group_id, reqs, route_keys)


def offline_request(gone: asyncio.Event) -> Request:
    """A request whose client disconnects when `gone` is set (the batch was cancelled)."""

    async def receive() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "scheme": "http", "path": "/v1/batches",
             "root_path": "", "query_string": b"", "headers": [], "client": None,
             "server": None, "http_version": "1.1"}  # fmt: skip
    return Request(scope, receive)


def validation_error(e: ValidationError) -> APIError:
    """A body the endpoint's model refuses, as the 400 the online route would send."""
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(loc)
    message = first.get("msg", "invalid value")
    return APIError(f"{where}: {message}" if where else message, 400, param=loc[0] if loc else None)


async def answer_line(router: BatchRouter, endpoint: str, line: InputLine,
                      gone: asyncio.Event) -> LineAnswer:  # fmt: skip
    """The line's answer; raises ClientGone when the batch is cancelled before it is done."""
    model, serve = ENDPOINTS[endpoint]
    try:
        body = model.model_validate(line.body)
    except ValidationError as e:
        return LineAnswer.of_error(validation_error(e))
    if getattr(body, "stream", False):
        return LineAnswer.of_error(bad_request("stream is not supported in a batch", "stream"))
    request = offline_request(gone)
    while True:
        if gone.is_set():
            raise ClientGone()
        try:
            response = await serve(router, request, body)  # type: ignore[arg-type]
        except APIError as e:
            if e.status in RETRY_STATUSES:
                logger.debug("batch line %s waits: %s", line.custom_id, e.message)
                await asyncio.sleep(RETRY_S)
                continue
            return LineAnswer.of_error(e)
        except ClientGone:
            raise
        except Exception as e:  # a bug must fail the line, never the batch
            logger.exception("batch line %s failed", line.custom_id)
            return LineAnswer.of_error(APIError(f"internal error: {type(e).__name__}: {e}", 500))
        return LineAnswer(response.status_code, json.loads(bytes(response.body)))


def result_line(line: InputLine, answer: LineAnswer) -> bytes:
    """The line of the output (or error) file: OpenAI's batch request output object."""
    request_id = answer.body.get("id") or f"req_{uuid.uuid4().hex}"
    item = {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": line.custom_id,
        "response": {"status_code": answer.status_code, "request_id": request_id,
                     "body": answer.body},
        "error": None,
    }  # fmt: skip
    return (json.dumps(item, ensure_ascii=False) + "\n").encode()
