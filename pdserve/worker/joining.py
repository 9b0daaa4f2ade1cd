"""A worker that joins a running router (`pdserve worker --router`, issue 19), and leaves it.

The same `WorkerProcess` the launcher starts, with a membership life around its loop:

1. **join**: load the model, bind the inbox (and a decode worker's KV socket), then send the
   router `Register` (its inbox, its KV handshake) until the router's `PeerTable` welcomes it
   with its idx. `Register` is sent again every `register_interval_s` from a thread, so a
   restarted router learns the worker again.
2. **serve**: each `PeerTable` (workers joined or left) updates the outboxes to tokenizers and
   peer workers (`pdserve/membership.py`); a prefill worker opens the way to new decode
   workers' KV pools at once. The router routes here once every member has acked the table.
3. **leave** on SIGTERM (or SIGINT): `Leave` to the router, which routes nothing new here; the
   loop goes on until the router, once no request depends on this worker, sends `Shutdown`
   (or `drain_timeout_s` passes without one: the router is gone). A second signal stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import zmq

from pdserve import protocol
from pdserve.config.process_specs import WorkerSpec
from pdserve.heartbeat import HeartbeatSender
from pdserve.ipc import Outbox, push_socket
from pdserve.membership import JoinOptions, host_of, public_address, update_outboxes
from pdserve.worker.worker_process import WorkerProcess

logger = logging.getLogger(__name__)

_WAIT_LOG_S = 10.0  # how often to say the router has not answered yet

__all__ = ["JoinOptions", "JoinedWorker", "run_joined"]


class JoinedWorker:
    """A WorkerProcess plus its membership: `run()` joins, serves, leaves; returns an exit code."""

    def __init__(self, spec: WorkerSpec, options: JoinOptions) -> None:
        self.spec = spec
        self.options = options
        self.worker = WorkerProcess(spec)  # the model loads here; the inbox is bound
        bound = self.worker.inbox.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.address = public_address(bound, options.advertise_host)
        self.router_host = host_of(options.router_inbox) or "127.0.0.1"
        self.idx = -1
        self.refusal = ""  # why the router refused the latest Register ("": it did not)
        self.expelled = False  # refused after it had joined: it exits (1) instead of retrying
        self.is_leaving = threading.Event()
        self._to_router = Outbox(options.router_inbox)  # Leave: the signal handler's own socket
        self.worker.add_handler(protocol.PeerTable, self.on_peer_table)
        self.worker.add_handler(protocol.Shutdown, self._on_shutdown)

    @property
    def name(self) -> str:
        return self.spec.name

    def register_msg(self) -> protocol.Register:
        role = self.worker.role
        handshake = role.handshake if hasattr(role, "handshake") else None
        return protocol.Register(
            name=self.name,
            role=self.spec.role,
            pid=os.getpid(),
            inbox=self.address,
            kv_handshake=handshake,
            num_pages=self.worker.core.runner.num_pages,
        )

    # ------------------------------------------------------------------ the life

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not self._join():
            return 0
        heartbeat = HeartbeatSender(
            self.name, self.options.router_inbox, self.spec.heartbeat_interval_s
        ).start()
        keepalive = threading.Thread(target=self._register_again, name="register", daemon=True)
        keepalive.start()
        logger.info(
            "worker %s (%s) joined as idx %d at %s",
            self.name,
            self.spec.role,
            self.idx,
            self.address,
        )
        try:
            self.worker.run()
        finally:
            self.is_leaving.set()
            heartbeat.stop()
            self._to_router.close()
        if self.expelled:
            return 1
        logger.info("worker %s left the cluster", self.name)
        return 0

    def _join(self) -> bool:
        """Register until welcomed; False when stopped first. A refusal (the name is in use,
        perhaps by this worker's previous process, until the router finds it silent) is
        logged and retried."""
        register = self.register_msg()
        next_log = time.monotonic() + _WAIT_LOG_S
        while self.idx < 0 and not self.is_leaving.is_set():
            self._to_router.send(register)
            deadline = time.monotonic() + self.options.register_interval_s
            while self.idx < 0 and time.monotonic() < deadline:
                msg = self.worker.inbox.recv(timeout_ms=100)
                if isinstance(msg, protocol.PeerTable):
                    self.on_peer_table(msg)
            if self.idx < 0 and time.monotonic() > next_log:
                next_log += _WAIT_LOG_S
                if self.refusal:
                    logger.error("worker %s: the router refuses it: %s", self.name, self.refusal)
                else:
                    logger.warning(
                        "worker %s: no answer from the router at %s yet",
                        self.name,
                        self.options.router_inbox,
                    )
        return self.idx >= 0 and not self.is_leaving.is_set()

    def _register_again(self) -> None:
        """Every register_interval_s until leaving: a sign of life, and the way back in after
        a router restart (it knows nobody then). Its own socket: this is another thread."""
        sock = push_socket(zmq.Context.instance(), self.options.router_inbox, linger_ms=0, hwm=4)
        frame = protocol.encode(self.register_msg())
        try:
            while not self.is_leaving.wait(self.options.register_interval_s):
                try:
                    sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            sock.close(0)

    # ------------------------------------------------------------------ messages

    def on_peer_table(self, msg: protocol.PeerTable) -> list:
        if msg.for_name != self.name:
            return []
        if msg.error:  # refused: _join tries again
            self.refusal = msg.error
            if self.idx >= 0:  # taken out after joining (say, it cannot load an adapter)
                logger.error("worker %s: the router refuses it: %s", self.name, msg.error)
                self.expelled = True
                self.is_leaving.set()
                self.worker.stop()
            return []
        if msg.idx != self.idx:
            self._set_idx(msg.idx)
        worker = self.worker
        update_outboxes(worker.to_decodes, msg.decode_inboxes, Outbox, self.address)
        update_outboxes(worker.to_prefills, msg.prefill_inboxes, Outbox, self.address)
        tokenizers = [public_address(a, self.router_host) for a in msg.tokenizer_inboxes]
        update_outboxes(worker.to_tokenizers, tokenizers, Outbox)
        self._connect_kv(msg.decode_kv_handshakes)
        if worker.to_router is not None:
            worker.to_router.send(protocol.PeerTableAck(self.name, msg.version))
        return []

    def _set_idx(self, idx: int) -> None:
        """The idx this worker answers to: set at the welcome (again after a router restart)."""
        if self.idx >= 0:
            logger.warning(
                "worker %s: idx %d -> %d (the router restarted)", self.name, self.idx, idx
            )
        self.idx = idx
        if hasattr(self.worker.role, "decode_idx"):  # a decode worker names itself in its tasks
            self.worker.role.decode_idx = idx

    def _connect_kv(self, handshakes: list[dict | None]) -> None:
        """A prefill worker opens the way to each decode worker's KV pool now (tcp), so the
        first request does not pay for it; other backends connect on the first PrefillTask."""
        sender = getattr(self.worker.role, "sender", None)
        if sender is None:
            return
        for idx, handshake in enumerate(handshakes):
            if handshake is None or handshake.get("backend") != "tcp":
                continue
            try:
                sender.connect(idx, handshake)
            except Exception as e:  # the first PrefillTask tries again, and reports a failure
                logger.warning("worker %s: KV connect to decode %d failed: %s", self.name, idx, e)

    def _on_shutdown(self, msg: protocol.Shutdown) -> list:
        logger.info("worker %s: the router let it go", self.name)
        self.worker.stop()
        return []

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.is_leaving.is_set():
            logger.warning("worker %s: second signal: stopping now", self.name)
            self.worker.stop()
            return
        self.is_leaving.set()
        if self.idx < 0:  # not joined yet: nothing to drain
            return
        logger.info(
            "worker %s: leaving: draining (at most %.0f s)", self.name, self.options.drain_timeout_s
        )
        self._to_router.send(protocol.Leave(self.name, os.getpid()))
        timer = threading.Timer(self.options.drain_timeout_s, self._drain_timed_out)
        timer.daemon = True
        timer.start()

    def _drain_timed_out(self) -> None:
        logger.warning(
            "worker %s: no Shutdown from the router within %.0f s: stopping",
            self.name,
            self.options.drain_timeout_s,
        )
        self.worker.stop()


def run_joined(spec: WorkerSpec, options: JoinOptions) -> int:
    return JoinedWorker(spec, options).run()
