"""OpenAI's batch API: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (`after`,
`limit`), `POST /v1/batches/{id}/cancel`. The batches run in `batch_runner`."""

from __future__ import annotations

import time

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from pdserve.router.batch_line import ENDPOINTS
from pdserve.router.batch_service import BatchService
from pdserve.router.batch_store import COMPLETION_WINDOW_S, BatchRecord
from pdserve.router.errors import APIError, bad_request
from pdserve.router.serving_files import list_page

NOT_SERVED = {"/v1/embeddings": "this model does not serve embeddings"}


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _check_create(service: BatchService, body: CreateBatchRequest) -> None:
    if body.endpoint in NOT_SERVED:
        raise bad_request(
            f"endpoint {body.endpoint} is not supported in a batch: {NOT_SERVED[body.endpoint]}",
            "endpoint",
        )
    if body.endpoint not in ENDPOINTS:
        raise bad_request(
            f"endpoint={body.endpoint!r} is invalid: expected one of {sorted(ENDPOINTS)}",
            "endpoint",
        )
    if body.completion_window not in COMPLETION_WINDOW_S:
        raise bad_request(
            f"completion_window={body.completion_window!r} is invalid: expected one of "
            f"{sorted(COMPLETION_WINDOW_S)}",
            "completion_window",
        )
    record = service.files.get(body.input_file_id)
    if record is None:
        raise APIError(
            f"No such File object: {body.input_file_id}", 404, param="input_file_id",
            code="not_found",
        )  # fmt: skip
    if record.purpose != "batch":
        raise bad_request(
            f"file {record.id} has purpose {record.purpose!r}: expected 'batch'", "input_file_id"
        )


def _get(service: BatchService, batch_id: str) -> BatchRecord:
    record = service.batches.get(batch_id)
    if record is None:
        raise APIError(f"No such Batch object: {batch_id}", 404, param="batch_id", code="not_found")
    return record


def cancel_batch(service: BatchService, batch_id: str) -> BatchRecord:
    """Mark the batch `cancelling` and stop it; it becomes `cancelled` once its running lines
    are aborted and its files are published."""
    record = _get(service, batch_id)
    if record.status in ("cancelling", "cancelled"):
        return record
    if record.status not in ("validating", "in_progress"):
        raise APIError(
            f"Cannot cancel a batch with status {record.status!r}.", 409, code="invalid_state"
        )
    record = service.batches.update(batch_id, status="cancelling", cancelling_at=int(time.time()))
    service.runner.cancel(batch_id)
    return record


def add_batch_routes(app: FastAPI, service: BatchService) -> None:
    @app.post("/v1/batches")
    async def create_batch(body: CreateBatchRequest) -> Response:
        _check_create(service, body)
        record = service.batches.create(
            body.endpoint, body.input_file_id, body.completion_window, body.metadata
        )
        service.runner.launch(record.id)
        return JSONResponse(record.to_api())

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        return JSONResponse(_get(service, batch_id).to_api())

    @app.get("/v1/batches")
    async def list_batches(
        after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> Response:
        try:
            records, has_more = service.batches.list(after, limit)
        except ValueError as e:
            raise bad_request(str(e), "after") from None
        return list_page([r.to_api() for r in records], has_more)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> Response:
        return JSONResponse(cancel_batch(service, batch_id).to_api())
