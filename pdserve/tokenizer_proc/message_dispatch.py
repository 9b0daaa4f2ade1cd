"""One inbox message of the tokenizer process handed to its `TokenizerCore`, and the answers sent
on: tokenized requests to their workers, outputs and refusals to the router. Long prompts (and any
with images) are tokenized off the event loop, so the streams of other requests keep flowing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from pdserve.ipc import AsyncOutbox
from pdserve.protocol import (
    Abort,
    DetokenizeReq,
    GenerateReq,
    Message,
    TokenizedReq,
    TokenizeReq,
    TokenOut,
)
from pdserve.tokenizer_proc.ordered_output import error_output

if TYPE_CHECKING:
    from pdserve.tokenizer_proc.tokenizer_process import Prepared, TokenizerCore

logger = logging.getLogger(__name__)


def dispatch(
    core: TokenizerCore,
    msg: Message,
    to_router: AsyncOutbox,
    to_workers: list[AsyncOutbox],
    encoder: Executor | None = None,
) -> None:
    """Handle one message; a bad request is answered with an error, never raised. A long
    prompt is tokenized on `encoder` (None: everything inline)."""
    if isinstance(msg, TokenOut):
        for out in core.on_token_out(msg):
            to_router.send(out)
    elif isinstance(msg, GenerateReq):
        if encoder is not None and core.is_long(msg):
            _tokenize_off_loop(core, msg, to_router, to_workers, encoder)
        else:
            _answer(core, msg, to_router, to_workers, core.on_generate)
    elif isinstance(msg, Abort):
        core.on_abort(msg)
    elif isinstance(msg, (TokenizeReq, DetokenizeReq)):
        _answer_tokenize(core, msg, to_router, encoder)
    else:
        logger.warning("tokenizer%d: unexpected %s dropped", core.idx, type(msg).__name__)


def _answer(
    core: TokenizerCore,
    req: GenerateReq,
    to_router: AsyncOutbox,
    to_workers: list[AsyncOutbox],
    handle: Callable[[GenerateReq], tuple[int, TokenizedReq]],
) -> None:
    """Send the tokenized request on to its worker, or its refusal to the router."""
    try:
        worker_idx, tokenized = handle(req)
    except ValueError as e:
        logger.info("rid=%s: refused: %s", req.rid, e)
        to_router.send(error_output(req.rid, str(e)))
    except Exception as e:
        logger.exception("rid=%s: tokenization failed", req.rid)
        to_router.send(error_output(req.rid, f"internal error in tokenizer{core.idx}: {e!r}"))
    else:
        to_workers[worker_idx].send(tokenized)


def _answer_tokenize(
    core: TokenizerCore,
    msg: TokenizeReq | DetokenizeReq,
    to_router: AsyncOutbox,
    encoder: Executor | None,
) -> None:
    """/tokenize and /detokenize on the encoder thread, as long prompts are, so a big text never
    stalls the streams this loop serves (inline when there is no encoder)."""
    if encoder is None:
        to_router.send(core.on_tokenize(msg))
        return
    future = asyncio.get_running_loop().run_in_executor(encoder, core.on_tokenize, msg)
    future.add_done_callback(lambda fut: fut.cancelled() or to_router.send(fut.result()))


def _tokenize_off_loop(
    core: TokenizerCore,
    req: GenerateReq,
    to_router: AsyncOutbox,
    to_workers: list[AsyncOutbox],
    encoder: Executor,
) -> None:
    """`core.prepare` in the encoder thread, then `core.admit` back on the loop; a request
    aborted meanwhile is dropped (the router has answered it already)."""
    try:
        core.start_tokenizing(req.rid)
    except ValueError as e:
        to_router.send(error_output(req.rid, str(e)))
        return
    loop = asyncio.get_running_loop()
    if (req.image_data or req.video_data) and core.image_pool is not None:
        future = asyncio.ensure_future(_prepare_with_images(core, req, encoder))
    else:
        future = loop.run_in_executor(encoder, core.prepare, req)

    def done(fut: asyncio.Future[Prepared]) -> None:
        if fut.cancelled():
            return
        if not core.end_tokenizing(req.rid):
            fut.exception()  # an aborted request's failure is nobody's to report
            return
        _answer(core, req, to_router, to_workers, lambda r: core.admit(r, fut.result()))

    future.add_done_callback(done)


async def _prepare_with_images(
    core: TokenizerCore, req: GenerateReq, encoder: Executor
) -> Prepared:
    """The images fetched and preprocessed on the image pool (a slow URL holds up no other
    request), then the request tokenized on the encoder thread."""
    loop = asyncio.get_running_loop()
    images = await loop.run_in_executor(core.image_pool, core.load_images, req)
    return await loop.run_in_executor(encoder, core.prepare, req, images)
