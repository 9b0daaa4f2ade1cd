"""Files of OpenAI's files API: one row each in SQLite, the bytes in `files/<id>` of the data dir.

A file exists for clients once its row does: an upload streams into `files/<id>.part` and gets its
row after the rename, and a batch's output grows in `files/<id>` and gets its row when the batch
ends.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pdserve.router.data_dir import DataDir

logger = logging.getLogger(__name__)

Order = Literal["asc", "desc"]


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str  # "batch" (uploads), "batch_output" (a batch's output and error files)
    bytes: int
    created_at: int  # unix seconds
    status: str = "processed"

    def to_api(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "status_details": None,
        }


_COLUMNS = "id, filename, purpose, bytes, created_at, status"


class FileStore:
    def __init__(self, data: DataDir) -> None:
        self.data = data
        self.conn = data.conn

    def path(self, file_id: str) -> Path:
        return self.data.file_path(file_id)

    def part_path(self, file_id: str) -> Path:
        """Where an upload streams before it is complete."""
        return self.data.file_path(f"{file_id}.part")

    def add(self, file_id: str, filename: str, purpose: str) -> FileRecord:
        """Give the bytes already at `path(file_id)` their row: the file exists from now on."""
        record = FileRecord(
            file_id, filename, purpose, self.path(file_id).stat().st_size, int(time.time())
        )
        with self.conn:
            self.conn.execute(
                f"INSERT OR IGNORE INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.purpose, record.bytes, record.created_at,
                 record.status),
            )  # fmt: skip
        logger.info("file %s added: %s, %d bytes", file_id, filename, record.bytes)
        return record

    def get(self, file_id: str) -> FileRecord | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return FileRecord(**dict(row)) if row else None

    def list(
        self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
        order: Order = "desc",
    ) -> tuple[list[FileRecord], bool]:  # fmt: skip
        """A page of files, newest first (`order="desc"`), after the file `after`; and whether
        there are more. ValueError when `after` names no file."""
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            row = self.conn.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise ValueError(f"after={after!r}: no such file")
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(row["seq"])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        direction = "DESC" if order == "desc" else "ASC"
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM files {clause} ORDER BY seq {direction} LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        records = [FileRecord(**dict(r)) for r in rows]
        return records[:limit], len(records) > limit

    def delete(self, file_id: str) -> bool:
        """Remove the file's row and bytes; False when there was no such file."""
        with self.conn:
            num = self.conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if num:
            self.path(file_id).unlink(missing_ok=True)
            logger.info("file %s deleted", file_id)
        return bool(num)
