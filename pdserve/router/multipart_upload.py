"""A `multipart/form-data` upload streamed to disk as it arrives: the file part goes straight into
its destination in chunks (never whole in memory, never spooled elsewhere first), its size is
checked as it grows, and the small text fields (`purpose`) are collected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from pdserve.router.errors import APIError, bad_request

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose, ...)
FILE_FIELD = "file"


class Upload(NamedTuple):
    filename: str
    num_bytes: int
    fields: dict[str, str]  # the text fields


def too_large(max_bytes: int) -> APIError:
    return APIError(
        f"the file is larger than {max_bytes} bytes (router.max_file_bytes)",
        413,
        param=FILE_FIELD,
        code="file_too_large",
    )


class _Parts:
    """The parser's callbacks: headers of each part, then its bytes to the file or a field."""

    def __init__(self, dest: BinaryIO, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.num_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._field: bytearray | None = None  # the text field being read, None for the file
        self._field_name = ""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD and b"filename" in params:
            if self.filename is not None:
                raise bad_request("give one file per upload", FILE_FIELD)
            self.filename = params[b"filename"].decode("utf-8", "replace") or "upload"
            self._field = None
        else:
            self._field = bytearray()
            self._field_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is None:
            self.num_bytes += end - start
            if self.num_bytes > self.max_bytes:
                raise too_large(self.max_bytes)
            self.dest.write(data[start:end])
            return
        self._field.extend(data[start:end])
        if len(self._field) > MAX_FIELD_BYTES:
            raise bad_request(f"field {self._field_name!r} is too long", self._field_name)

    def _part_end(self) -> None:
        if self._field is not None:
            self.fields[self._field_name] = self._field.decode("utf-8", "replace")
            self._field = None


async def receive_upload(request: Request, dest: Path, max_bytes: int) -> Upload:
    """Stream the request's file part into `dest`; 400 for a malformed form, 413 past
    `max_bytes`. On an error `dest` may hold part of the file: the caller removes it."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise bad_request("expected a multipart/form-data body with a `file` and a `purpose`")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + MAX_FIELD_BYTES:
        raise too_large(max_bytes)
    with dest.open("wb") as f:
        parts = _Parts(f, max_bytes)
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as e:
            raise bad_request(f"malformed multipart body: {e}") from None
    if parts.filename is None:
        raise bad_request("the form has no `file` part", FILE_FIELD)
    return Upload(parts.filename, parts.num_bytes, parts.fields)
