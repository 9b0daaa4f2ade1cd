"""Routes beside the online inference API: OpenAI's files and batches, Vertex AI's prediction.

`register_platform_routes(app, router)` is the one call `build_app` makes for them. It also wraps
the app's lifespan, so the batch service starts after the router (resuming unfinished batches)
and stops before it (running batch lines are aborted and resume on the next start).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from pdserve.env import vertex_env
from pdserve.router.batch_service import BatchService
from pdserve.router.router import Router
from pdserve.router.serving_batches import add_batch_routes
from pdserve.router.serving_files import add_file_routes
from pdserve.router.serving_vertex import add_vertex_routes


def register_platform_routes(app: FastAPI, router: Router) -> BatchService:
    service = BatchService(router)
    app.state.batch_service = service
    add_file_routes(app, service)
    add_batch_routes(app, service)
    add_vertex_routes(app, router, vertex_env())
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            await service.start()
            try:
                yield state
            finally:
                await service.stop()

    app.router.lifespan_context = lifespan
    return service
