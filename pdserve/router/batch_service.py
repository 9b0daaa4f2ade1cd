"""The files and batches of one router: its data directory, the two stores and the batch runner.

The data directory is opened on the first files or batches request, or at start when it already
holds a database (there may be batches to resume). A router that never serves a batch never
creates it, and one that cannot open it (not writable, held by another router) still serves
everything else: only the files and batches routes answer 503, naming the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from pdserve.env import default_data_dir
from pdserve.router.batch_runner import BatchRunner
from pdserve.router.batch_store import BatchStore
from pdserve.router.data_dir import DataDir, DataDirError, db_exists, open_data_dir
from pdserve.router.errors import APIError
from pdserve.router.file_store import FileStore
from pdserve.router.router import Router

logger = logging.getLogger(__name__)

OPEN_RETRY_S = 30.0  # at start, how long to wait for a previous router to let the data dir go


class BatchService:
    def __init__(self, router: Router) -> None:
        self.router = router
        spec = router.spec
        self.path = Path(spec.data_dir).expanduser() if spec.data_dir else default_data_dir()
        self.max_file_bytes = spec.max_file_bytes
        self.max_running_lines = spec.max_running_batch_lines
        self._data: DataDir | None = None
        self._files: FileStore | None = None
        self._batches: BatchStore | None = None
        self._runner: BatchRunner | None = None
        self._opener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Resume the previous run's batches, if this data directory has any (in the background:
        the router it replaces may still be letting the directory go)."""
        if db_exists(self.path):
            self._opener = asyncio.create_task(self._open_when_free(), name="batch-data-dir")

    async def _open_when_free(self) -> None:
        deadline = time.monotonic() + OPEN_RETRY_S
        while True:
            try:
                self._open()
                return
            except APIError as e:
                if time.monotonic() > deadline:
                    logger.error("%s; batches resume on the first files or batches request",
                                 e.message)  # fmt: skip
                    return
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
        if self._runner is not None:
            await self._runner.stop()
        if self._data is not None:
            self._data.close()
        self._data = self._files = self._batches = self._runner = None

    @property
    def files(self) -> FileStore:
        self._open()
        assert self._files is not None
        return self._files

    @property
    def batches(self) -> BatchStore:
        self._open()
        assert self._batches is not None
        return self._batches

    @property
    def runner(self) -> BatchRunner:
        self._open()
        assert self._runner is not None
        return self._runner

    def _open(self) -> None:
        if self._data is not None:
            return
        try:
            data = open_data_dir(self.path)
        except DataDirError as e:
            raise APIError(f"files and batches are unavailable: {e}", 503) from None
        self._data = data
        self._files = FileStore(data)
        self._batches = BatchStore(data)
        self._runner = BatchRunner(self.router, self._files, self._batches, self.max_running_lines)
        self._runner.resume()
