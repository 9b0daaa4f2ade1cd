"""Reading a request group's outputs for a route: the whole result, or the start of a stream.

Both race the client: when it disconnects first, the group is cancelled (Abort to the tokenizer and
the workers) and `ClientGone` is raised. Errors in the first outputs become `APIError`, so a stream
that fails before its first token is still answered with a plain HTTP error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request

from pdserve.protocol import ReqOutput
from pdserve.router.choice_state import ChoiceState
from pdserve.router.errors import APIError, tokenizer_error
from pdserve.router.request_tracker import RequestGroup
from pdserve.router.router import Router

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response started."""


def failure_of(out: ReqOutput, abort_is_error: bool = True) -> APIError | None:
    """The HTTP error a final output stands for, if any.

    A tokenizer error (prompt too long, ...) is the client's: 400. An abort carries its status (500
    for a lost worker, 504 for a timeout, 400 otherwise, as SGLang); /generate passes client-side
    aborts (`abort_is_error=False`) through as finish_reason "abort" instead."""
    if out.error is not None:
        return tokenizer_error(out.error)
    finish = out.finish
    if finish is None or not finish.is_abort:
        return None
    if not finish.is_error and not abort_is_error:
        return None
    return APIError(finish.message or "aborted", finish.status_code)


async def race_client(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    raise ClientGone()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(group: RequestGroup) -> list[ChoiceState]:
    """Read the group to the end: one state per choice, by index."""
    choices = [ChoiceState(i, rid) for i, rid in enumerate(group.rids)]
    while not group.is_done:
        index, out = await group.next_output()
        choices[index].add(out)
    return choices


async def read_first_outputs(group: RequestGroup) -> list[tuple[int, ReqOutput]]:
    """Read until every choice has its first output (or the group is done)."""
    started: set[int] = set()
    buffered = []
    while len(started) < group.num_choices and not group.is_done:
        index, out = await group.next_output()
        buffered.append((index, out))
        started.add(index)
    return buffered


async def run_to_end(
    router: Router, request: Request, group: RequestGroup, abort_is_error: bool = True
) -> list[ChoiceState]:
    """A non-streaming request's choices; raises APIError for a failed choice."""
    try:
        choices = await race_client(request, collect(group))
    except BaseException:
        router.cancel(group)
        raise
    for choice in choices:
        err = failure_of(choice.final_output(), abort_is_error)
        if err is not None:
            raise err
    return choices


async def open_stream(
    router: Router, request: Request, group: RequestGroup, abort_is_error: bool = True
) -> list[tuple[int, ReqOutput]]:
    """The first outputs of every choice, read before the response headers go out."""
    try:
        buffered = await race_client(request, read_first_outputs(group))
    except BaseException:
        router.cancel(group)
        raise
    for _, out in buffered:
        err = failure_of(out, abort_is_error)
        if err is not None:
            router.cancel(group, "another choice of the request failed")
            raise err
    return buffered


async def iter_outputs(
    buffered: list[tuple[int, ReqOutput]], group: RequestGroup
) -> AsyncIterator[tuple[int, ReqOutput]]:
    """The buffered first outputs, then the rest as they arrive, until every choice ended."""
    for item in buffered:
        yield item
    while not group.is_done:
        yield await group.next_output()


def guarded(
    router: Router, group: RequestGroup, events: Callable[[], AsyncIterator[str]]
) -> AsyncIterator[str]:
    """The stream body; whatever ends it early (disconnect, an error event) aborts the rest."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events():
                yield event
        finally:
            router.cancel(group)

    return body()
