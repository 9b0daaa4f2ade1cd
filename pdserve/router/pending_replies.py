"""The router's own questions to a tokenizer process (/tokenize, /detokenize), each waiting for
its one answer by rid.

Unlike a generation request, such a question holds no state anywhere but here: nothing to abort,
no metrics. An answer that never comes (a lost tokenizer) ends the wait at the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pdserve.protocol import TokenizeOut


class PendingReplies:
    """rid -> the future its answer resolves."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[TokenizeOut]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    async def ask(self, rid: str, send: Callable[[], None], timeout_s: float) -> TokenizeOut:
        """Register `rid`, call `send` (which sends the question), and wait for the answer.
        Raises TimeoutError after `timeout_s`, and whatever `send` raises."""
        if rid in self._waiting:
            raise ValueError(f"rid {rid!r} is already waiting for an answer")
        future: asyncio.Future[TokenizeOut] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            send()
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(rid, None)

    def deliver(self, answer: TokenizeOut) -> None:
        """Resolve the wait of `answer.rid`; a late answer (the wait timed out) is dropped."""
        future = self._waiting.pop(answer.rid, None)
        if future is not None and not future.done():
            future.set_result(answer)
