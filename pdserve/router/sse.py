"""Server-sent events: `data: <json>` lines, and a response that notices a client leaving.

Starlette's StreamingResponse only watches for a disconnect under some ASGI versions; this one
always does, and always closes the body iterator, so the route's cleanup (Abort) runs at once.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(message: str, status: int, err_type: str | None = None) -> str:
    err_type = err_type or ("server_error" if status >= 500 else "invalid_request_error")
    return sse({"error": {"message": message, "type": err_type, "param": None, "code": status}})


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: Any, status_code: int = 200) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, status_code=status_code, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
