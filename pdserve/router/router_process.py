"""The router process: `main(spec)` serves the HTTP API until Shutdown (or a signal).

It tells the launcher `Ready(name="router")` once uvicorn is listening, not before. On Shutdown it
stops accepting, lets running requests finish within the grace period, then ends the rest with an
error event each (a stream is never cut without one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from pdserve.profiling import profiled
from pdserve.router.app import build_app
from pdserve.router.router import Router

logger = logging.getLogger(__name__)

_FLUSH_S = 2.0  # after the grace period: time for streams to write their error event and close


def main(spec: dict[str, Any]) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [router] %(name)s: %(message)s"
    )
    router = Router(spec)
    try:  # the loop runs every stream's writes: uvloop's is the faster one, when it is installed
        import uvloop
    except ImportError:
        uvloop = None
    with profiled("router"):  # PDSERVE_PROFILE_DIR: a diagnostic
        if uvloop is None:
            asyncio.run(serve(router))
        else:
            uvloop.run(serve(router))


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
        await _shut_down(server, serving, router)
    shutdown.cancel()


async def _shut_down(server: uvicorn.Server, serving: asyncio.Task[None], router: Router) -> None:
    """uvicorn stops accepting and waits for open requests; when the grace period is over, the
    router ends what is left with an error, and the streams get _FLUSH_S to write it."""
    grace_s = max(router.shutdown_grace_s, 0.0)
    server.config.timeout_graceful_shutdown = grace_s + _FLUSH_S
    server.should_exit = True
    done, _ = await asyncio.wait({serving}, timeout=grace_s)
    if not done:
        num = router.end_all("the server is shutting down: the grace period is over", 503)
        logger.info("grace period over: %d request(s) ended with an error", num)
        await serving
