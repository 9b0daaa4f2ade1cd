"""The router process: `main(spec)` serves the HTTP API until Shutdown (or a signal).

It tells the launcher `Ready(name="router")` once uvicorn is listening, not before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from pdserve.router.app import build_app
from pdserve.router.router import Router

logger = logging.getLogger(__name__)


def main(spec: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [router] %(name)s: %(message)s"
    )
    asyncio.run(serve(Router(spec)))


async def serve(router: Router) -> None:
    app = build_app(router)
    config = uvicorn.Config(
        app,
        host=router.spec.host,
        port=router.spec.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if serving.done():
        await serving  # raises when uvicorn could not start (port taken, ...)
        raise RuntimeError(f"router could not listen on {router.spec.host}:{router.spec.port}")
    url = f"http://{router.spec.host}:{router.spec.port}"
    logger.info("serving %s on %s", router.spec.model_name, url)
    router.send_ready({"url": url})
    shutdown = asyncio.create_task(router.shutdown_requested.wait())
    await asyncio.wait({serving, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        # uvicorn stops accepting, lets open requests run up to the grace period, then the
        # app's lifespan stops the router, which ends whatever is left with an error.
        server.config.timeout_graceful_shutdown = max(router.shutdown_grace_s, 0.1)
        server.should_exit = True
        await serving
    shutdown.cancel()
