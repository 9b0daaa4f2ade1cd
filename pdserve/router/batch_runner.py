"""Runs batches inside the router process: one asyncio task per active batch, all of them sharing
`max_running_lines` slots, so batch work never holds more than that many requests at once.

A batch's life here:
  1. validating   the input file is checked in a thread (`batch_input.check_input`); a malformed
                  file fails the batch with OpenAI's `errors`
  2. in_progress  lines without an answer yet are fed in file order, each taking a slot, through
                  `batch_line.answer_line`; each answer is appended to the output or error file and
                  recorded in SQLite in one step (no await between), so a crash loses at most the
                  lines that were running
  3. completed    (or cancelled) the output and error files get their rows: clients can read them
On start, every active batch is resumed: its files are cut back to what SQLite recorded, and only
the lines with no answer run. Cancelling stops feeding and aborts the running lines; answered lines
stay in the output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from pdserve.router.batch_input import MAX_LINES, InputLine, check_input, iter_input
from pdserve.router.batch_line import BatchRouter, answer_line, result_line
from pdserve.router.batch_store import BatchRecord, BatchStore, Offsets
from pdserve.router.file_store import FileStore
from pdserve.router.group_reader import ClientGone
from pdserve.router.router import Router

logger = logging.getLogger(__name__)


class ResultFiles:
    """The output and error files of a running batch, appended to with flushes."""

    def __init__(self, output: Path, error: Path, offsets: Offsets) -> None:
        self.sizes = [offsets.output, offsets.error]
        self.files = []
        for path, size in ((output, offsets.output), (error, offsets.error)):
            if path.exists() and path.stat().st_size > size:
                os.truncate(path, size)  # bytes no recorded line owns: a crash's leftovers
            self.files.append(path.open("ab"))

    def append(self, is_error: bool, data: bytes) -> int:
        """Write one answer line; returns the file's length after it."""
        f = self.files[int(is_error)]
        f.write(data)
        f.flush()  # the bytes reach the OS before SQLite records them
        self.sizes[int(is_error)] += len(data)
        return self.sizes[int(is_error)]

    def close(self) -> None:
        for f in self.files:
            f.close()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class BatchRunner:
    def __init__(self, router: Router, files: FileStore, batches: BatchStore,
                 max_running_lines: int, max_lines: int = MAX_LINES) -> None:  # fmt: skip
        self.router = BatchRouter(router)
        self.files = files
        self.batches = batches
        self.max_lines = max_lines
        self._slots = asyncio.Semaphore(max_running_lines)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: dict[str, asyncio.Event] = {}

    def resume(self) -> None:
        """Carry on every batch left active by the previous run (a restart, or a crash)."""
        for batch in self.batches.active():
            logger.info("batch %s resumes (%s)", batch.id, batch.status)
            self.launch(batch.id)

    def launch(self, batch_id: str) -> None:
        self._cancelled[batch_id] = asyncio.Event()
        self._tasks[batch_id] = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")

    def cancel(self, batch_id: str) -> None:
        """Stop feeding the batch and abort its running lines (its status says `cancelling`)."""
        event = self._cancelled.get(batch_id)
        if event is not None:
            event.set()

    async def stop(self) -> None:
        """Stop every batch where it is (the router is shutting down): they resume on restart."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str) -> None:
        try:
            batch = self.batches.get(batch_id)
            if batch is not None and batch.status == "validating":
                batch = await self._validate(batch)
            if batch is not None and batch.status == "in_progress":
                await self._feed(batch)
            if batch is not None and batch.status != "failed":
                self._finalize(batch_id)
        except asyncio.CancelledError:
            logger.info("batch %s stopped; it resumes when the router starts again", batch_id)
            raise
        except Exception as e:
            logger.exception("batch %s failed", batch_id)
            error = {"code": "internal_error", "message": f"{type(e).__name__}: {e}",
                     "param": None, "line": None}  # fmt: skip
            self.batches.update(batch_id, status="failed", failed_at=int(time.time()),
                                errors=json.dumps([error]))  # fmt: skip
        finally:
            self._tasks.pop(batch_id, None)
            self._cancelled.pop(batch_id, None)

    async def _validate(self, batch: BatchRecord) -> BatchRecord:
        path = self.files.path(batch.input_file_id)
        check = await asyncio.to_thread(check_input, path, batch.endpoint, self.max_lines)
        now = int(time.time())
        if check.errors:
            logger.info("batch %s failed validation: %s", batch.id, check.errors[0]["message"])
            return self.batches.update(
                batch.id, status="failed", failed_at=now, errors=json.dumps(check.errors)
            )
        current = self.batches.get(batch.id)
        if current is not None and current.status == "cancelling":  # cancelled meanwhile
            return self.batches.update(batch.id, num_total=check.num_lines)
        logger.info("batch %s in progress: %d requests", batch.id, check.num_lines)
        return self.batches.update(
            batch.id, status="in_progress", in_progress_at=now, num_total=check.num_lines
        )

    async def _feed(self, batch: BatchRecord) -> None:
        """Run every line that has no answer yet, at most `max_running_lines` at once overall."""
        out_path = self.files.path(batch.out_file_id)
        err_path = self.files.path(batch.err_file_id)
        offsets = self.batches.reconcile(batch.id, _size(out_path), _size(err_path))
        done = self.batches.done_lines(batch.id)
        results = ResultFiles(out_path, err_path, offsets)
        gone = self._cancelled[batch.id]
        try:
            async with asyncio.TaskGroup() as group:
                for line in iter_input(self.files.path(batch.input_file_id), batch.endpoint):
                    if line.line in done:
                        continue
                    if not await self._take_slot(gone):
                        break
                    group.create_task(self._run_line(batch, line, results, gone))
        finally:
            results.close()

    async def _take_slot(self, gone: asyncio.Event) -> bool:
        """Wait for a free slot; False (and no slot taken) when the batch is cancelled first."""
        if gone.is_set():
            return False
        acquire = asyncio.ensure_future(self._slots.acquire())
        cancelled = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({acquire, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.cancelled():
            return False
        if gone.is_set():
            self._slots.release()
            return False
        return True

    async def _run_line(self, batch: BatchRecord, line: InputLine, results: ResultFiles,
                        gone: asyncio.Event) -> None:  # fmt: skip
        try:
            answer = await answer_line(self.router, batch.endpoint, line, gone)
        except ClientGone:
            return  # the batch was cancelled: the line stays unanswered
        finally:
            self._slots.release()
        end = results.append(answer.is_error, result_line(line, answer))
        self.batches.record_line(batch.id, line.line, answer.is_error, end)

    def _finalize(self, batch_id: str) -> None:
        """Publish the output and error files and end the batch (completed or cancelled)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            return
        output_id = self._publish(batch.out_file_id, batch.num_completed, f"{batch_id}_output")
        error_id = self._publish(batch.err_file_id, batch.num_failed, f"{batch_id}_error")
        now = int(time.time())
        end = {"status": "completed", "completed_at": now}
        if batch.status == "cancelling":
            end = {"status": "cancelled", "cancelled_at": now}
        batch = self.batches.update(
            batch_id, output_file_id=output_id, error_file_id=error_id, finalizing_at=now, **end
        )
        counts = batch.to_api()["request_counts"]
        logger.info("batch %s %s: %s", batch_id, batch.status, counts)

    def _publish(self, file_id: str, num_lines: int, name: str) -> str | None:
        path = self.files.path(file_id)
        if num_lines == 0:
            path.unlink(missing_ok=True)
            return None
        self.files.add(file_id, f"{name}.jsonl", "batch_output")
        return file_id
