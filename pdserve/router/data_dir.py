"""The router's data directory: uploaded files, batch outputs, and the SQLite database that
describes them (`router.data_dir`, `--data-dir`).

Layout:
    pdserve.sqlite   files, batches and the lines each batch has answered (WAL mode)
    lock             held (flock) by the one router using the directory
    files/<id>       each file's bytes; `<id>.part` while an upload is streaming in

One router at a time: a second one finds the lock taken and serves no files or batches (a batch
resumed by two routers would answer its lines twice). The lock dies with its process, so a router
killed with SIGKILL leaves the directory usable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

logger = logging.getLogger(__name__)

DB_NAME = "pdserve.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    out_file_id TEXT NOT NULL,          -- where answers are written while the batch runs
    err_file_id TEXT NOT NULL,
    output_file_id TEXT,                -- out_file_id once the batch ended with answers
    error_file_id TEXT,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    num_total INTEGER NOT NULL DEFAULT 0,
    num_completed INTEGER NOT NULL DEFAULT 0,
    num_failed INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,                      -- JSON object or NULL
    errors TEXT                         -- JSON list of validation errors or NULL
);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,              -- 1-based line number in the input file
    is_error INTEGER NOT NULL,          -- 0: in the output file; 1: in the error file
    end_offset INTEGER NOT NULL,        -- that file's length once the answer was written
    PRIMARY KEY (batch_id, line)
);
"""


class DataDirError(RuntimeError):
    """The data directory cannot be used (not writable, or held by another router)."""


class DataDir:
    """An open data directory: its lock, its database connection and its paths."""

    def __init__(self, root: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.root = root
        self.conn = conn
        self._lock_fd = lock_fd
        self.files_dir = root / "files"

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def close(self) -> None:
        self.conn.close()
        os.close(self._lock_fd)  # releases the flock


def open_data_dir(path: str | Path) -> DataDir:
    """Create (if needed), lock and open the data directory; DataDirError when it cannot."""
    root = Path(path).expanduser()
    try:
        (root / "files").mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise DataDirError(f"data dir {str(root)!r} cannot be used: {e}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        raise DataDirError(
            f"data dir {str(root)!r} is in use by another pdserve router: give this one its own "
            "(router.data_dir, --data-dir)"
        ) from None
    try:
        conn = _connect(root / DB_NAME)
    except sqlite3.Error as e:
        os.close(lock_fd)
        raise DataDirError(f"data dir {str(root)!r}: database error: {e}") from None
    for stale in (root / "files").glob("*.part"):  # uploads cut off by a crash
        stale.unlink(missing_ok=True)
    logger.info("data dir %s open", root)
    return DataDir(root, conn, lock_fd)


def _connect(db_path: Path) -> sqlite3.Connection:
    # Every change runs in a `with conn:` block: one transaction, committed at its end. The
    # connection is only used on the router's event loop thread, but that thread is not always
    # the one that opened it (tests run uvicorn in a thread).
    conn = sqlite3.connect(db_path, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: consistent after a crash, cheap commits
    conn.executescript(_SCHEMA)
    return conn


def db_exists(path: str | Path) -> bool:
    """Whether a data directory with a database is already at `path` (a restart)."""
    return (Path(path).expanduser() / DB_NAME).is_file()
