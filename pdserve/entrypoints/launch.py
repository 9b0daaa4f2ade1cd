"""Starts and stops the process tree of one node: router, tokenizers, prefill/decode/mixed workers.

The only module that knows every process. `Cluster` is a context manager, used by the CLI, the
process-backed Engine and the end-to-end tests alike. Children are plain `python -m pdserve.entrypoints.launch
--child KIND` processes that read their spec as msgpack on stdin (the CUDA IPC handle holds
bytes): no pickle crosses the boundary.

While the cluster runs, a watcher thread supervises the children (`supervisor.py`): a tokenizer or
worker that exits is reported to the router (its requests end with an error) and restarted; a router
that exits has every request aborted on every process, then is restarted too. Every child exits
with the launcher, even after `kill -9` of it (`parent_watch.py`). Every inbox's address comes
from `plan_endpoints` (`endpoint_plan.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from pdserve import curve_auth, protocol
from pdserve.config.process_specs import KVTransferSpec, TokenizerSpec, WorkerSpec
from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.config.topology import Topology, chat_template_text
from pdserve.config.topology_sections import WorkerPlan
from pdserve.entrypoints.endpoint_plan import Endpoint, plan_endpoints
from pdserve.entrypoints.parent_watch import exit_with_parent
from pdserve.entrypoints.supervisor import Child, ChildKind, Supervisor
from pdserve.ipc import Inbox, Outbox, new_ipc_address, new_socket_dir

logger = logging.getLogger(__name__)

_ENTRIES = {
    "router": "pdserve.router.router_process:main",
    "tokenizer": "pdserve.tokenizer_proc.tokenizer_process:main",
    "worker": "pdserve.worker.worker_process:main",
}
_POLL_S = 0.2
_ROUTER_EXIT_S = 5.0  # past the grace period: the router ends what is left, then exits


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
        # tcp sockets across nodes are CURVE-authenticated with it: this process's, children's
        self.cluster_secret = self.topology.cluster_secret()  # required with nodes
        curve_auth.set_cluster_secret(self.cluster_secret)
        self.node = node
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.children: list[Child] = []
        self._stopping = threading.Event()
        self.ready_info: dict[str, dict[str, Any]] = {}
        self._socket_dir = new_socket_dir()
        self._launcher_inbox_addr = new_ipc_address("launcher", self._socket_dir)
        self._launcher_inbox: Inbox | None = None
        self.port = self.topology.router.port or _free_port(_INTERNAL_PORTS)
        if self.topology.router.membership:  # joining workers find the router at port + 1
            self.topology = self.topology.with_router_address(port=self.port)
        self._router_inbox = ""  # where the router is reached (it may be on another node)
        self._peer_inboxes: dict[str, str] = {}  # every tokenizer and worker of the cluster
        self._watcher: threading.Thread | None = None
        self.router_lost = threading.Event()  # the router exited past its restart cap
        # Children are spawned from this one thread, which lives until stop(): their parent-death
        # signal fires when the spawning *thread* ends (parent_watch.py).
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="pdserve-spawn")

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
            self._watcher = threading.Thread(target=self._watch, name="pdserve-watch", daemon=True)
            self._watcher.start()
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
        self._router_inbox = ep["router"].connect
        self._peer_inboxes = {name: ep[name].connect for name in tokenizers}
        self._peer_inboxes.update({w.name: ep[w.name].connect for w in workers})
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
                    heartbeat_interval_s=topo.supervision.heartbeat_interval_s,
                    chat_template=self._chat_template or None,
                    image_limits=dataclasses.asdict(topo.tokenizer.image_limits),
                    video_limits=dataclasses.asdict(topo.tokenizer.video_limits),
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
            fault_injection=topo.fault_injection,
            heartbeat_interval_s=topo.supervision.heartbeat_interval_s,
        )
        env = {}
        if w.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in w.gpus)
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(self._torch_threads())
        self._spawn("worker", w.name, ep[w.name].connect, spec.to_dict(), env)

    @functools.cached_property
    def _chat_template(self) -> str:
        """The topology's chat template as text, read once on this machine ("": the model's
        own); every tokenizer and the router get it."""
        value = self.topology.chat_template
        return chat_template_text(value) if value is not None else ""

    def _torch_threads(self) -> int:
        """A CPU worker's share of the cores; a GPU worker's host tensors are small, and a thread
        per core only spins (2.4 ms of CPU per streamed token in a 64-stream run on the H200)."""
        if self.topology.device == "cpu":
            return cpu_threads_per_worker(len(self._local_workers()))
        return _GPU_WORKER_TORCH_THREADS

    def _local_workers(self) -> list[WorkerPlan]:
        return [w for w in self.topology.workers() if self._is_local(w.node)]

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
                "tokenizer_names": tokenizers,
                "workers": [dataclasses.asdict(e) for e in entries],
                "liveness_timeout_s": topo.supervision.heartbeat_timeout_s,
                "progress_timeout_s": topo.supervision.progress_timeout_s,
                "routing_policy": topo.router.routing_policy,
                "limits": topo.router.limits.to_dict(),
                "data_dir": topo.router.data_dir,
                "max_file_bytes": topo.router.max_file_bytes,
                "max_running_batch_lines": topo.router.max_running_batch_lines,
                "reasoning_parser": topo.router.reasoning_parser or "",
                "chat_template": self._chat_template,
                "max_context_len": self._max_context_len(),
                "launcher_inbox": self._launcher_inbox_addr,
                "topology": topo.to_dict(),
                "membership": topo.router.membership,
                "advertised_tokenizer_inboxes": [ep[t].bind for t in tokenizers]
                if topo.router.membership
                else [],
                "drain_timeout_s": topo.router.drain_timeout_s,
            }
        )

    def _max_context_len(self) -> int:
        from pdserve.config.engine_config import ModelConfig

        config = ModelConfig.from_hf(self.topology.model)
        return config.context_limit(self.topology.scheduler.max_context_len)

    def _spawn(
        self,
        kind: ChildKind,
        name: str,
        inbox: str,
        spec: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> None:
        proc = self._start_process(kind, spec, env or {})
        self.children.append(Child(name, kind, proc, inbox, spec, env or {}))
        logger.info("started %s (pid %d)", name, proc.pid)

    def _start_process(
        self, kind: ChildKind, spec: dict[str, Any], env: dict[str, str]
    ) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "pdserve.entrypoints.launch",
            "--child",
            kind,
            "--log-level",
            self.log_level,
            "--parent-pid",
            str(os.getpid()),
        ]
        # PYTHONSAFEPATH: `-m` would otherwise put the working directory first on the import
        # path, and a folder named `pdserve` there would shadow the package.
        secret_env = curve_auth.child_env(self.cluster_secret)
        env = {**os.environ, "PYTHONSAFEPATH": "1", **secret_env, **env}
        return self._spawner.submit(_popen, cmd, env, spec).result()

    def _respawn(self, child: Child) -> subprocess.Popen:
        """The same spec again, so the same inbox: peers' sockets reconnect by themselves."""
        return self._start_process(child.kind, child.spec, child.env)

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
                response = httpx.get(f"{self.url}/health", timeout=2.0)
                if response.status_code == 200 or self._is_waiting_for_workers(response):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(_POLL_S)
        raise TimeoutError(f"the router at {self.url} did not report healthy in {timeout_s:.0f} s")

    def _is_waiting_for_workers(self, response: Any) -> bool:
        """With membership, a router no worker has joined yet is up once its tokenizers are
        (its /health stays 503 until a worker joins)."""
        if not self.topology.router.membership:
            return False
        processes = response.json().get("processes", {})
        return response.json().get("status") != "starting" and all(
            status == "healthy" for status in processes.values()
        )

    @property
    def router_inbox(self) -> str:
        """Where workers join (`pdserve worker --router`): the router's internal inbox."""
        return self._router_inbox

    def _raise_if_dead(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{child.name} exited with code {code} while starting (its log is above)"
                )

    # ------------------------------------------------------------------ run and stop

    def stop(self, grace_s: float = 10.0) -> None:
        """Router first (stop accepting, finish running requests within grace_s), then the rest."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()  # no restart may start while the children are stopped
        self._watcher = None
        alive = [c for c in self.children if c.is_running]
        router = [c for c in alive if c.kind == "router"]
        for child in router:
            self._send(child.inbox, protocol.Shutdown(grace_s=grace_s))
        _wait_exit(router, grace_s + _ROUTER_EXIT_S)
        rest = [c for c in alive if c.kind != "router"]
        for child in rest:
            self._send(child.inbox, protocol.Shutdown())
        _wait_exit(rest, 5.0)
        for child in self.children:
            if child.is_running:
                child.proc.kill()
                child.proc.wait()
        self.children = []
        if self._launcher_inbox is not None:
            self._launcher_inbox.close()
            self._launcher_inbox = None
        self._spawner.shutdown(wait=True)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _send(self, address: str, msg: Any) -> None:
        out = Outbox(address)
        out.send(msg)
        out.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self, grace_s: float = 30.0) -> int:
        """Block until SIGINT/SIGTERM, then stop gracefully: 0. Or until the router is gone for
        good (it exited past its restart cap, so nothing would ever answer): stop, 1."""
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(_POLL_S):
            if self.router_lost.is_set():
                logger.error("the router is gone for good: stopping every process")
                self.stop(grace_s=0)
                return 1
        logger.info("stopping: letting running requests finish (up to %.0f s)", grace_s)
        self.stop(grace_s)
        return 0

    # ------------------------------------------------------------------ supervision

    def _watch(self) -> None:
        """Watcher thread: reports and restarts the children that exit while the cluster runs."""
        supervisor = Supervisor(self.topology.supervision, self._respawn, self._on_child_exit)
        while not self._stopping.wait(_POLL_S):
            try:
                self._note_ready()
                supervisor.poll(self.children, time.monotonic())
            except Exception:
                logger.exception("supervising the children failed")

    def _note_ready(self) -> None:
        """Restarted children say Ready again; the router learns it from their heartbeats."""
        if self._launcher_inbox is None:
            return
        for msg in self._launcher_inbox.recv_all():
            if isinstance(msg, protocol.Ready):
                self.ready_info[msg.name] = msg.info
                logger.info("%s is ready again", msg.name)

    def _on_child_exit(self, child: Child, restarting: bool) -> None:
        """A tokenizer's or worker's exit goes to the router, which ends its requests. A router's
        exit orphans every request in flight (nobody can answer them): abort them everywhere."""
        code = child.proc.returncode or 0
        if child.kind != "router":
            exited = protocol.ProcessExited(child.name, child.proc.pid, code, restarting)
            self._send(self._router_inbox, exited)
            return
        abort = protocol.Abort(abort_all=True, message=f"the router exited (code {code})")
        for address in self._peer_inboxes.values():
            self._send(address, abort)
        if not restarting:
            self.router_lost.set()


def _wait_exit(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            child.proc.terminate()


def _popen(cmd: list[str], env: dict[str, str], spec: dict[str, Any]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(msgpack.packb(spec, use_bin_type=True))
    proc.stdin.close()
    return proc


_GPU_WORKER_TORCH_THREADS = 2


def cpu_threads_per_worker(num_workers: int, num_cores: int | None = None) -> int:
    """Torch threads for each CPU worker on a node: the cores shared out. Torch's default (a thread
    per core in every worker) makes the workers starve each other and the tokenizer and router."""
    cores = num_cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, num_workers))


# Ports picked here lie below Linux's ephemeral range (32768-60999), which outgoing connections
# draw from: a port the OS hands out (`bind(0)`) lies inside it, and one was once taken by an
# outgoing connection between the pick and the router's bind (uvicorn's exit code 3).
_PICKED_PORTS = (20000, 32768)
_INTERNAL_PORTS = 17  # a picked router port leaves room for tcp inboxes at + 1 .. + 16


def _free_port(block: int = 1) -> int:
    """A TCP port p with p .. p + block - 1 free now (the router's internal sockets take
    port + 1, + 2, ... with several nodes or membership)."""
    rng = random.Random()
    low, high = _PICKED_PORTS
    for _ in range(100):
        base = rng.randrange(low, high - block)
        if all(_can_bind(port) for port in range(base, base + block)):
            return base
    with socket.socket() as s:  # that range is full: any port the OS gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=sorted(_ENTRIES), required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when it is gone")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{args.child}] %(name)s: %(message)s",
    )
    if args.parent_pid:
        exit_with_parent(args.parent_pid)
    spec = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    module, func = _ENTRIES[args.child].split(":")
    getattr(importlib.import_module(module), func)(spec)


if __name__ == "__main__":
    _child_main()
