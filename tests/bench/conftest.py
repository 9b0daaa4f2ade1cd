"""A fake OpenAI-compatible streaming server with known timings, and a runner for `pdserve bench`."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.bench.cli import add_parser


class FakeServer:
    """Streams `max_tokens` one-token chunks, and answers /v1/embeddings with a 4-value vector.
    With `fail_pattern`, of every 5 requests (in arrival order) the 1st answers HTTP 500 and the
    2nd sends an error event after two chunks."""

    FIRST_DELAY_S = 0.05  # before the first token chunk
    GAP_S = 0.01  # between token chunks
    EMBED_DELAY_S = 0.02  # before an embeddings answer

    def __init__(self) -> None:
        self.base_url = ""
        self.model_root: str | None = None  # listed as the model's `root` at /v1/models
        self.reset()

    def reset(self, fail_pattern: bool = False) -> None:
        self.fail_pattern = fail_pattern
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def _chunk(self, payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def _stream(self, body: dict[str, Any], fail: bool, usage: bool) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.FIRST_DELAY_S)
            num_tokens = int(body["max_tokens"])
            for i in range(num_tokens):
                if i > 0:
                    await asyncio.sleep(self.GAP_S)
                if fail and i == 2:
                    yield self._chunk({"error": {"message": "boom", "type": "server_error"}})
                    return
                yield self._chunk({"object": "text_completion", "choices": [{"text": "t"}]})
            if usage:
                prompt = body["prompt"]
                prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                yield self._chunk(
                    {
                        "choices": [],
                        "usage": {"prompt_tokens": prompt_len, "completion_tokens": num_tokens},
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    async def completions(self, request: Request, usage: bool) -> Any:
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        self.auth_headers.append(request.headers.get("authorization"))
        if self.fail_pattern and index % 5 == 0:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        fail = self.fail_pattern and index % 5 == 1
        return StreamingResponse(self._stream(body, fail, usage), media_type="text/event-stream")

    async def embeddings(self, request: Request) -> Any:
        """One 4-value vector per input after EMBED_DELAY_S; HTTP 500s as for completions."""
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        if self.fail_pattern and index % 5 == 0:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.EMBED_DELAY_S)
        finally:
            self.in_flight -= 1
        prompt = body["input"]
        prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        data = [{"object": "embedding", "embedding": [0.5, 0.5, 0.5, 0.5], "index": 0}]
        usage = {"prompt_tokens": prompt_len, "total_tokens": prompt_len}
        return {"object": "list", "data": data, "model": "fake-model", "usage": usage}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            model = {"id": "fake-model", "object": "model", "root": self.model_root}
            return {"object": "list", "data": [model]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self.completions(request, usage=True)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Any:
            return await self.embeddings(request)

        @app.post("/nousage/v1/completions")
        async def completions_no_usage(request: Request) -> Any:
            return await self.completions(request, usage=False)

        return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    fake = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        threading.Event().wait(0.01)
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


@pytest.fixture
def run_bench() -> Any:
    """Parse `pdserve bench ...` arguments with the real parser and run the handler."""
    return _run_bench
