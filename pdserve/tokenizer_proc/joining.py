"""A tokenizer that joins a running router (`pdserve tokenizer --router`, issue 19), and leaves it.

The same `serve()` the launcher runs (tokenizer_process.py), with a membership life around it:

1. **join**: load the tokenizer, bind the inbox, then send the router `Register` (role
   "tokenizer", its inbox) every `register_interval_s`: until welcomed, then as a sign of life
   and the way back into a restarted router. The router's `PeerTable` welcomes it with its idx
   (the `tokenizer_idx` workers send its tokens by) and the decode-side workers' inboxes. The
   router routes requests here once every member has applied a table that holds it.
2. **serve**: each `PeerTable` updates the outboxes to decode workers, as for the router's own
   tokenizers; liveness is the usual heartbeat thread.
3. **leave** on SIGTERM (or SIGINT): `Leave`; the router routes nothing new here and, once no
   request routed through this tokenizer is left, sends `Shutdown`: the loop ends and the process
   exits 0. Without one within `drain_timeout_s` (the router is gone) it stops anyway; a second
   signal stops it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import zmq

from pdserve import protocol
from pdserve.config.process_specs import TokenizerSpec
from pdserve.ipc import AsyncInbox, AsyncOutbox, push_socket
from pdserve.membership import JoinOptions, public_address
from pdserve.tokenizer_proc.tokenizer_process import TokenizerCore, serve

logger = logging.getLogger(__name__)

_WAIT_LOG_S = 10.0  # how often to say the router has not welcomed this tokenizer yet
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class JoinedTokenizer:
    """`serve()` plus membership: `await run()` joins, serves, leaves; returns an exit code.
    `serve()` calls `start` once its sockets are bound, `on_peer_table` for every table, and
    `close` when it ends."""

    def __init__(self, spec: TokenizerSpec, options: JoinOptions) -> None:
        self.spec = spec
        self.options = options
        self.address = ""  # the inbox as peers reach it (known once bound)
        self.idx = -1  # tokenizer_idx given by the router's welcome (-1: not welcomed yet)
        self.refusal = ""  # why the router refused the latest Register ("": it did not)
        self.is_leaving = False
        self._serving: asyncio.Task[None] | None = None
        self._to_router: AsyncOutbox | None = None
        self._registering: asyncio.Task[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in _SIGNALS:
            loop.add_signal_handler(signum, self._on_signal)
        self._serving = asyncio.create_task(serve(self.spec, self), name="tokenizer")
        try:
            await self._serving
        except asyncio.CancelledError:  # stop(): a second signal, or a drain that timed out
            pass
        finally:
            for signum in _SIGNALS:
                loop.remove_signal_handler(signum)
        logger.info("tokenizer %s left the cluster", self.name)
        return 0

    # ------------------------------------------------------------------ serve()'s hooks

    def start(self, inbox: AsyncInbox, to_router: AsyncOutbox) -> None:
        bound = inbox.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.address = public_address(bound, self.options.advertise_host)
        self._to_router = to_router
        self._registering = asyncio.create_task(self._register(), name="register")

    def on_peer_table(self, msg: protocol.PeerTable, core: TokenizerCore) -> bool:
        """Take the welcome's idx; False for a table not to apply (a refusal)."""
        if msg.for_name and msg.for_name != self.name:
            return False
        if msg.error:  # refused: the next Register tries again
            if msg.error != self.refusal:
                logger.error("tokenizer %s: the router refuses it: %s", self.name, msg.error)
            self.refusal = msg.error
            return False
        self.refusal = ""
        if msg.idx >= 0 and msg.idx != self.idx:
            if self.idx >= 0:
                logger.warning(
                    "tokenizer %s: idx %d -> %d (the router restarted)",
                    self.name,
                    self.idx,
                    msg.idx,
                )
            else:
                logger.info("tokenizer %s joined as idx %d at %s", self.name, msg.idx, self.address)
            self.idx = core.idx = msg.idx
        return True

    def close(self) -> None:
        if self._registering is not None:
            self._registering.cancel()
        if self._drain_timer is not None:
            self._drain_timer.cancel()

    # ------------------------------------------------------------------ joining, leaving

    async def _register(self) -> None:
        """Register every register_interval_s until leaving, on a socket of its own with a short
        queue: while the router is away, a pile of stale Registers would prove nothing."""
        frame = protocol.encode(
            protocol.Register(name=self.name, role="tokenizer", pid=os.getpid(), inbox=self.address)
        )
        sock = push_socket(zmq.Context.instance(), self.options.router_inbox, linger_ms=0, hwm=4)
        next_log = time.monotonic() + _WAIT_LOG_S
        try:
            while not self.is_leaving:
                try:
                    sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    pass
                await asyncio.sleep(self.options.register_interval_s)
                if self.idx < 0 and not self.refusal and time.monotonic() > next_log:
                    next_log += _WAIT_LOG_S
                    logger.warning(
                        "tokenizer %s: no answer from the router at %s yet",
                        self.name,
                        self.options.router_inbox,
                    )
        finally:
            sock.close(0)

    def _on_signal(self) -> None:
        if self.is_leaving:
            logger.warning("tokenizer %s: second signal: stopping now", self.name)
            self.stop()
            return
        self.is_leaving = True
        if self.idx < 0 or self._to_router is None:  # not joined: nothing to drain
            self.stop()
            return
        logger.info(
            "tokenizer %s: leaving: draining (at most %.0f s)",
            self.name,
            self.options.drain_timeout_s,
        )
        self._to_router.send(protocol.Leave(self.name, os.getpid()))
        loop = asyncio.get_running_loop()
        self._drain_timer = loop.call_later(self.options.drain_timeout_s, self._drain_timed_out)

    def _drain_timed_out(self) -> None:
        logger.warning(
            "tokenizer %s: no Shutdown from the router within %.0f s: stopping",
            self.name,
            self.options.drain_timeout_s,
        )
        self.stop()

    def stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()


def run_joined(spec: TokenizerSpec, options: JoinOptions) -> int:
    """Run a joined tokenizer in this process (on uvloop when it is installed)."""
    member = JoinedTokenizer(spec, options)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(member.run())
    return uvloop.run(member.run())
