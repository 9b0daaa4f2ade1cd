"""Your own web server on top of the Engine: FastAPI routes awaiting `engine.async_generate`
(SGLang's engine/custom_server.py, which uses Sanic).

Usage:
    python examples/engine/custom_server.py --port 8080      # tiny offline model, Ctrl-C to stop
    curl -X POST http://127.0.0.1:8080/generate -H 'Content-Type: application/json' \\
        -d '{"prompt": "The capital of France is"}'
    curl -N -X POST http://127.0.0.1:8080/generate_stream -H 'Content-Type: application/json' \\
        -d '{"prompt": "The capital of France is"}'

Add `--model /models/Llama-3.2-1B-Instruct` for a real model. Without --model it builds pdserve's
tiny random-weight model (a few seconds, offline), so the text is gibberish.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

import pdserve

engine = None  # the process Engine, started with the app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global engine
    engine = pdserve.Engine(model_path=app.state.model_path, device=app.state.device)
    print("engine ready", flush=True)
    yield
    engine.shutdown()  # Ctrl-C or SIGTERM: stop the engine's processes with the server


app = FastAPI(lifespan=lifespan)


class GenerateBody(BaseModel):
    prompt: str


@app.post("/generate")
async def generate(body: GenerateBody) -> PlainTextResponse:
    # async_generate returns a dict, like Engine.generate
    result = await engine.async_generate(body.prompt)
    return PlainTextResponse(result["text"])


@app.post("/generate_stream")
async def generate_stream(body: GenerateBody) -> StreamingResponse:
    # with stream=True, an async iterator of chunks whose "text" is cumulative
    chunks = await engine.async_generate(body.prompt, stream=True)

    async def new_text() -> AsyncIterator[str]:
        sent = ""
        async for chunk in chunks:
            yield chunk["text"][len(sent) :]
            sent = chunk["text"]

    return StreamingResponse(new_text(), media_type="text/plain")


def tiny_model() -> str:
    """The tiny model of `pdserve demo`, built into ~/.cache/pdserve on first use."""
    from pdserve.tiny_model import cached_tiny_model

    return str(cached_tiny_model())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: tiny model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()

    app.state.model_path = args.model or tiny_model()
    app.state.device = args.device
    try:
        uvicorn.run(app, host=args.host, port=args.port)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass


# The __main__ guard is needed: the Engine starts the server's processes.
if __name__ == "__main__":
    main()
