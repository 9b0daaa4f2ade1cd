"""OpenAI's files API: `POST /v1/files` (multipart, purpose=batch), `GET /v1/files`,
`GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`."""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pdserve.router.batch_service import BatchService
from pdserve.router.errors import APIError, bad_request
from pdserve.router.file_store import FileRecord, new_file_id
from pdserve.router.multipart_upload import receive_upload

logger = logging.getLogger(__name__)

UPLOAD_PURPOSES = ("batch",)


def not_found(file_id: str) -> APIError:
    return APIError(f"No such File object: {file_id}", 404, param="file_id", code="not_found")


def get_file(service: BatchService, file_id: str) -> FileRecord:
    record = service.files.get(file_id)
    if record is None:
        raise not_found(file_id)
    return record


async def upload_file(service: BatchService, request: Request) -> FileRecord:
    """Stream the upload into the data dir; the file exists once it is whole and checked."""
    store = service.files
    file_id = new_file_id()
    part = store.part_path(file_id)
    try:
        upload = await receive_upload(request, part, service.max_file_bytes)
        purpose = upload.fields.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(
                f"purpose={purpose!r} is not supported: expected one of {list(UPLOAD_PURPOSES)}",
                "purpose",
            )
        part.rename(store.path(file_id))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return store.add(file_id, upload.filename, purpose)


def add_file_routes(app: FastAPI, service: BatchService) -> None:
    @app.post("/v1/files")
    async def create_file(request: Request) -> Response:
        return JSONResponse((await upload_file(service, request)).to_api())

    @app.get("/v1/files")
    async def list_files(
        purpose: str | None = None,
        after: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        order: Literal["asc", "desc"] = "desc",
    ) -> Response:
        try:
            records, has_more = service.files.list(purpose, after, limit, order)
        except ValueError as e:
            raise bad_request(str(e), "after") from None
        return list_page([r.to_api() for r in records], has_more)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return JSONResponse(get_file(service, file_id).to_api())

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        record = get_file(service, file_id)
        return FileResponse(service.files.path(record.id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        get_file(service, file_id)
        batch_id = service.batches.uses_input(file_id)
        if batch_id is not None:
            raise bad_request(f"file {file_id} is the input of {batch_id}, which is running")
        service.files.delete(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def list_page(data: list[dict[str, Any]], has_more: bool) -> JSONResponse:
    """One page of a list endpoint in OpenAI's shape (files, batches)."""
    first_id = data[0]["id"] if data else None
    last_id = data[-1]["id"] if data else None
    page = {"object": "list", "data": data, "has_more": has_more}
    return JSONResponse({**page, "first_id": first_id, "last_id": last_id})
