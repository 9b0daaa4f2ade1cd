"""Batches of OpenAI's batch API in SQLite: one row per batch, one row per answered input line.

A line's row is written in the same step as its answer is appended to the output (or error) file,
and records that file's length after it (`end_offset`). So after a crash the files can be cut back
to what the rows say (`reconcile`), and a resumed batch runs exactly the lines that have no row:
each line is answered once.

Status: validating -> in_progress -> completed, or validating -> failed (a malformed input file);
cancel: validating | in_progress -> cancelling -> cancelled.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

from pdserve.router.data_dir import DataDir
from pdserve.router.file_store import new_file_id

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
    "cancelled",
]  # fmt: skip
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}


@dataclass(frozen=True)
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    out_file_id: str  # answers are written here while the batch runs
    err_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    num_total: int
    num_completed: int
    num_failed: int
    metadata: str | None  # JSON
    errors: str | None  # JSON list of {code, message, param, line}

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_api(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        errors = json.loads(self.errors) if self.errors else None
        api: dict[str, Any] = {"id": self.id, "object": "batch", "endpoint": self.endpoint}
        api["errors"] = {"object": "list", "data": errors} if errors else None
        for key in ("input_file_id", "completion_window", "status", "output_file_id",
                    "error_file_id", "created_at", "in_progress_at", "expires_at",
                    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                    "cancelled_at"):  # fmt: skip
            api[key] = getattr(self, key)
        api["request_counts"] = {
            "total": self.num_total,
            "completed": self.num_completed,
            "failed": self.num_failed,
        }
        api["metadata"] = json.loads(self.metadata) if self.metadata else None
        return api


_COLUMNS = ", ".join(f.name for f in fields(BatchRecord))
_UPDATABLE = frozenset(f.name for f in fields(BatchRecord)) - {"id", "created_at"}


class Offsets(NamedTuple):
    """The lengths the output and error files must have: everything after is unrecorded."""

    output: int
    error: int


class BatchStore:
    def __init__(self, data: DataDir) -> None:
        self.conn = data.conn

    def create(
        self, endpoint: str, input_file_id: str, completion_window: str,
        metadata: dict[str, str] | None,
    ) -> BatchRecord:  # fmt: skip
        now = int(time.time())
        values = {
            "id": f"batch_{uuid.uuid4().hex[:24]}", "endpoint": endpoint,
            "input_file_id": input_file_id, "completion_window": completion_window,
            "status": "validating", "out_file_id": new_file_id(), "err_file_id": new_file_id(),
            "created_at": now, "expires_at": now + COMPLETION_WINDOW_S[completion_window],
            "metadata": json.dumps(metadata) if metadata is not None else None,
        }  # fmt: skip
        names = ", ".join(values)
        with self.conn:
            self.conn.execute(
                f"INSERT INTO batches ({names}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
        record = self.get(values["id"])
        assert record is not None  # just inserted
        return record

    def get(self, batch_id: str) -> BatchRecord | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        return BatchRecord(**dict(row)) if row else None

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[BatchRecord], bool]:
        """A page of batches, newest first, after the batch `after`; and whether more follow.
        ValueError when `after` names no batch."""
        clause, args = "", []
        if after is not None:
            row = self.conn.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise ValueError(f"after={after!r}: no such batch")
            clause, args = "WHERE seq < ?", [row["seq"]]
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM batches {clause} ORDER BY seq DESC LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        records = [BatchRecord(**dict(r)) for r in rows]
        return records[:limit], len(records) > limit

    def active(self) -> list[BatchRecord]:
        """Batches a restart must carry on, oldest first."""
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM batches WHERE status IN ({marks}) ORDER BY seq",
            ACTIVE_STATUSES,
        ).fetchall()
        return [BatchRecord(**dict(r)) for r in rows]

    def uses_input(self, file_id: str) -> str | None:
        """The id of an active batch reading `file_id`, if any."""
        marks = ", ".join("?" * len(ACTIVE_STATUSES))
        row = self.conn.execute(
            f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({marks}) LIMIT 1",
            (file_id, *ACTIVE_STATUSES),
        ).fetchone()
        return row["id"] if row else None

    def update(self, batch_id: str, **values: Any) -> BatchRecord:
        """Set columns (status, timestamps, counts, ...) of one batch; returns the new record."""
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"batch columns {sorted(unknown)} cannot be updated")
        names = ", ".join(f"{k} = ?" for k in values)
        with self.conn:
            self.conn.execute(
                f"UPDATE batches SET {names} WHERE id = ?", (*values.values(), batch_id)
            )
        record = self.get(batch_id)
        if record is None:
            raise KeyError(batch_id)
        return record

    # ------------------------------------------------------------------ lines

    def record_line(self, batch_id: str, line: int, is_error: bool, end_offset: int) -> None:
        """One line answered: its row and the batch's counts, in one transaction."""
        counter = "num_failed" if is_error else "num_completed"
        with self.conn:
            self.conn.execute(
                "INSERT INTO batch_lines (batch_id, line, is_error, end_offset) VALUES (?, ?, ?, ?)",
                (batch_id, line, int(is_error), end_offset),
            )
            self.conn.execute(
                f"UPDATE batches SET {counter} = {counter} + 1 WHERE id = ?", (batch_id,)
            )

    def done_lines(self, batch_id: str) -> set[int]:
        rows = self.conn.execute("SELECT line FROM batch_lines WHERE batch_id = ?", (batch_id,))
        return {r["line"] for r in rows}

    def reconcile(self, batch_id: str, output_size: int, error_size: int) -> Offsets:
        """After a crash: forget lines whose answer is not (wholly) in its file, recount, and
        return the lengths to cut the files to (any bytes past them belong to no line)."""
        with self.conn:
            for is_error, size in ((0, output_size), (1, error_size)):
                self.conn.execute(
                    "DELETE FROM batch_lines WHERE batch_id = ? AND is_error = ? AND end_offset > ?",
                    (batch_id, is_error, size),
                )
            self.conn.execute(
                "UPDATE batches SET "
                "num_completed = (SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND is_error = 0), "
                "num_failed = (SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND is_error = 1) "
                "WHERE id = ?",
                (batch_id, batch_id, batch_id),
            )
        ends = self.conn.execute(
            "SELECT is_error, MAX(end_offset) AS end_offset FROM batch_lines WHERE batch_id = ? "
            "GROUP BY is_error",
            (batch_id,),
        ).fetchall()
        by_kind = {r["is_error"]: r["end_offset"] for r in ends}
        return Offsets(by_kind.get(0, 0), by_kind.get(1, 0))
