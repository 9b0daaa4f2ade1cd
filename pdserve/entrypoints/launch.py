"""Starts and stops the process tree of one node: router, tokenizers, prefill/decode/mixed workers.

The only module that knows every process. `Cluster` is a context manager, used by the CLI, the
process-backed Engine and the end-to-end tests alike. Children are plain `python -m pdserve.entrypoints.launch
--child KIND` processes that read their spec as msgpack on stdin (the CUDA IPC handle holds
bytes): no pickle crosses the boundary.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from pdserve import protocol
from pdserve.config.process_specs import KVTransferSpec, TokenizerSpec, WorkerSpec
from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.config.topology import Topology
from pdserve.config.topology_sections import WorkerPlan
from pdserve.ipc import Inbox, Outbox, new_ipc_address, new_socket_dir

logger = logging.getLogger(__name__)

_ENTRIES = {
    "router": "pdserve.router.router_process:main",
    "tokenizer": "pdserve.tokenizer_proc.tokenizer_process:main",
    "worker": "pdserve.worker.worker_process:main",
}
_POLL_S = 0.2


@dataclass
class Child:
    name: str
    kind: str
    proc: subprocess.Popen
    inbox: str


@dataclass(frozen=True)
class Endpoint:
    """A process's inbox: the owner binds `bind`, its peers connect to `connect`."""

    bind: str
    connect: str


def plan_endpoints(
    topo: Topology, workers: list[WorkerPlan], socket_dir: str | None = None
) -> dict[str, Endpoint]:
    """Every inbox of the cluster, and each decode worker's KV socket (`<name>-kv`).

    One machine: fresh ipc:// paths. Several: tcp on each process's node, at router.port + 1 + k
    for the k-th name in a fixed order, so every node's launcher computes the same plan.
    """
    names = ["router"] + [f"tokenizer{i}" for i in range(topo.tokenizer.replicas)]
    node_of: dict[str, str | None] = dict.fromkeys(names, topo.router.node)
    for w in workers:
        node_of[w.name] = w.node
        if w.role == "decode":
            node_of[f"{w.name}-kv"] = w.node
    if not topo.is_multi_node:
        return {
            name: Endpoint(a, a) for name in node_of for a in [new_ipc_address(name, socket_dir)]
        }
    plan = {}
    for k, (name, node) in enumerate(node_of.items()):
        port = topo.router.port + 1 + k
        plan[name] = Endpoint(
            f"tcp://{topo.bind_address(node)}:{port}", f"tcp://{topo.node_address(node)}:{port}"
        )
    return plan


class Cluster:
    """`with Cluster(topology) as c: ... c.url ...` starts everything, and always tears it down."""

    def __init__(
        self,
        topology: Topology,
        node: str | None = None,
        log_level: str = "info",
        start_timeout_s: float = 600.0,
    ) -> None:
        if topology.is_multi_node and node not in {n.name for n in topology.nodes}:
            names = sorted(n.name for n in topology.nodes)
            raise ValueError(
                f"--node {node!r} is invalid: a topology with nodes starts one "
                f"machine's processes at a time: expected one of {names}"
            )
        if topology.is_multi_node and not topology.router.port:
            raise ValueError(
                "router.port=0 is invalid with nodes: every node derives its "
                "processes' ports from it: expected a fixed port"
            )
        if not topology.is_multi_node and node is not None:
            raise ValueError(f"--node {node!r}: the topology declares no nodes")
        self.topology = topology.resolved()
        self.node = node
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.children: list[Child] = []
        self._stopping = threading.Event()
        self.ready_info: dict[str, dict[str, Any]] = {}
        self._socket_dir = new_socket_dir()
        self._launcher_inbox_addr = new_ipc_address("launcher", self._socket_dir)
        self._launcher_inbox: Inbox | None = None
        self.port = self.topology.router.port or _free_port()

    @property
    def url(self) -> str:
        topo = self.topology
        host = topo.router.host
        if host in ("0.0.0.0", "::"):
            host = topo.node_address(topo.router.node) if topo.is_multi_node else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _is_local(self, node: str | None) -> bool:
        return not self.topology.is_multi_node or node == self.node

    # ------------------------------------------------------------------ start

    def start(self) -> Cluster:
        self._launcher_inbox = Inbox(self._launcher_inbox_addr)
        try:
            self._start_all()
            if self._is_local(self.topology.router.node):
                self._wait_healthy()
            threading.Thread(target=self._watch, name="pdserve-watch", daemon=True).start()
        except BaseException:
            self.stop(grace_s=0)
            raise
        return self

    def _start_all(self) -> None:
        """Spawn this node's processes, all at once: a prefill worker learns how to reach a
        decode worker's KV pool from the PrefillTasks it receives."""
        topo = self.topology
        workers = topo.workers()
        ep = plan_endpoints(topo, workers, self._socket_dir)
        decode_side = [w for w in workers if w.role in ("decode", "mixed")]
        prefills = [w for w in workers if w.role == "prefill"]
        tokenizers = [f"tokenizer{i}" for i in range(topo.tokenizer.replicas)]
        wiring = {
            "tokenizer_inboxes": [ep[t].connect for t in tokenizers],
            "router_inbox": ep["router"].connect,
            "launcher_inbox": self._launcher_inbox_addr,
            "decode_inboxes": [ep[w.name].connect for w in decode_side],
            "prefill_inboxes": [ep[w.name].connect for w in prefills],
        }
        for w in workers:
            if self._is_local(w.node):
                self._spawn_worker(w, ep, wiring)
        if self._is_local(topo.router.node):
            for i, name in enumerate(tokenizers):
                spec = TokenizerSpec(
                    name=name,
                    idx=i,
                    model_path=topo.model,
                    inbox=ep[name].bind,
                    router_inbox=ep["router"].connect,
                    worker_inboxes=tuple(wiring["decode_inboxes"]),
                    launcher_inbox=self._launcher_inbox_addr,
                    max_context_len=self._max_context_len(),
                )
                self._spawn("tokenizer", name, ep[name].connect, spec.to_dict())
            router_spec = self._router_spec(ep, tokenizers, workers)
            self._spawn("router", "router", ep["router"].connect, router_spec.to_dict(secrets=True))
        self._wait_ready([c.name for c in self.children])

    def _spawn_worker(self, w: WorkerPlan, ep: dict[str, Endpoint], wiring: dict[str, Any]) -> None:
        topo = self.topology
        kv = KVTransferSpec(backend=topo.kv_transfer.backend, timeout_s=topo.kv_transfer.timeout_s)
        if w.role == "decode" and (kv.backend == "tcp" or topo.is_multi_node):
            host = topo.node_address(w.node) if topo.is_multi_node else "127.0.0.1"
            kv = dataclasses.replace(kv, address=ep[f"{w.name}-kv"].bind, host=host)
        spec = WorkerSpec(
            name=w.name,
            role=w.role,
            idx=w.idx,
            engine=topo.engine_config(w),
            inbox=ep[w.name].bind,
            tokenizer_inboxes=tuple(wiring["tokenizer_inboxes"]),
            kv=kv,
            router_inbox=wiring["router_inbox"],
            launcher_inbox=wiring["launcher_inbox"],
            decode_inboxes=tuple(wiring["decode_inboxes"]),
            prefill_inboxes=tuple(wiring["prefill_inboxes"]),
        )
        env = {}
        if w.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in w.gpus)
        self._spawn("worker", w.name, ep[w.name].connect, spec.to_dict(), env)

    def _router_spec(
        self, ep: dict[str, Endpoint], tokenizers: list[str], workers: list[WorkerPlan]
    ) -> RouterSpec:
        topo = self.topology
        entries = [WorkerEntry(w.name, w.role, w.idx, ep[w.name].connect) for w in workers]
        return RouterSpec.from_dict(
            {
                "host": topo.router.host,
                "port": self.port,
                "api_key": topo.router.api_key,
                "model_name": topo.model_name,
                "model_path": topo.model,
                "inbox": ep["router"].bind,
                "tokenizer_inboxes": [ep[t].connect for t in tokenizers],
                "workers": [dataclasses.asdict(e) for e in entries],
                "routing_policy": topo.router.routing_policy,
                "limits": topo.router.limits.to_dict(),
                "max_context_len": self._max_context_len(),
                "launcher_inbox": self._launcher_inbox_addr,
                "topology": topo.to_dict(),
            }
        )

    def _max_context_len(self) -> int:
        from pdserve.config.engine_config import ModelConfig

        limit = ModelConfig.from_hf(self.topology.model).max_position_embeddings
        return self.topology.scheduler.max_context_len or limit

    def _spawn(
        self,
        kind: str,
        name: str,
        inbox: str,
        spec: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pdserve.entrypoints.launch",
            "--child",
            kind,
            "--log-level",
            self.log_level,
        ]
        # PYTHONSAFEPATH: `-m` would otherwise put the working directory first on the import
        # path, and a folder named `pdserve` there would shadow the package.
        env = {**os.environ, "PYTHONSAFEPATH": "1", **(env or {})}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(msgpack.packb(spec, use_bin_type=True))
        proc.stdin.close()
        self.children.append(Child(name, kind, proc, inbox))
        logger.info("started %s (pid %d)", name, proc.pid)

    def _wait_ready(self, names: list[str]) -> None:
        """Block until every named child said Ready; fail fast if one of them exits."""
        deadline = time.monotonic() + self.start_timeout_s
        missing = set(names) - set(self.ready_info)
        while missing:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"processes not ready after {self.start_timeout_s:.0f} s: {sorted(missing)}"
                )
            self._raise_if_dead()
            msg = self._launcher_inbox.recv(timeout_ms=int(_POLL_S * 1000))
            if isinstance(msg, protocol.Ready):
                self.ready_info[msg.name] = msg.info
                missing.discard(msg.name)

    def _wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Ready processes are not enough: wait until the router has heard every worker."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._raise_if_dead()
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(_POLL_S)
        raise TimeoutError(f"the router at {self.url} did not report healthy in {timeout_s:.0f} s")

    def _raise_if_dead(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{child.name} exited with code {code} while starting (its log is above)"
                )

    # ------------------------------------------------------------------ run and stop

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def stop(self, grace_s: float = 10.0) -> None:
        """Router first (stop accepting, finish running requests within grace_s), then the rest."""
        self._stopping.set()
        alive = [c for c in self.children if c.proc.poll() is None]
        router = [c for c in alive if c.kind == "router"]
        for child in router:
            self._send(child, protocol.Shutdown(grace_s=grace_s))
        _wait_exit(router, grace_s + 2.0)
        rest = [c for c in alive if c.kind != "router"]
        for child in rest:
            self._send(child, protocol.Shutdown())
        _wait_exit(rest, 5.0)
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
        self.children = []
        if self._launcher_inbox is not None:
            self._launcher_inbox.close()
            self._launcher_inbox = None
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _report_death(self, child: Child) -> None:
        logger.error(
            "%s exited with code %s; its requests end with an error",
            child.name,
            child.proc.returncode,
        )
        router = next((c for c in self.children if c.kind == "router"), None)
        if router is not None and router is not child:
            self._send(
                router, protocol.WorkerDied(name=child.name, exit_code=child.proc.returncode or 0)
            )

    def _send(self, child: Child, msg: Any) -> None:
        out = Outbox(child.inbox)
        out.send(msg)
        out.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, grace_s: float = 30.0) -> None:
        """Block until SIGINT/SIGTERM (the watcher thread reports dying children meanwhile);
        then stop gracefully."""
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(_POLL_S):
            pass
        logger.info("stopping: letting running requests finish (up to %.0f s)", grace_s)
        self.stop(grace_s)

    def _watch(self) -> None:
        """Watcher thread: a child that exits while the cluster runs is reported to the router."""
        reported: set[str] = set()
        while not self._stopping.wait(_POLL_S):
            for child in self.dead_children():
                if child.name not in reported:
                    reported.add(child.name)
                    self._report_death(child)


def _wait_exit(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            child.proc.terminate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=sorted(_ENTRIES), required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    spec = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.child}] %(name)s: %(message)s",
    )
    module, func = _ENTRIES[args.child].split(":")
    getattr(importlib.import_module(module), func)(spec)


if __name__ == "__main__":
    _child_main()
