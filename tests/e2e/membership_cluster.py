"""What the dynamic membership tests share: a router started alone (`router: {membership:
true}`), workers and tokenizers started on their own as on other machines (`pdserve worker|
tokenizer --router`), and a load of clients that records how each request ended."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdserve.config.topology import Topology
from pdserve.entrypoints.launch import Cluster, _free_port

SECRET = "dynamic-membership-test-secret"
MAX_TOKENS = 8
NUM_CLIENTS = 8
REQUEST_TIMEOUT_S = 30.0  # a request still open this long is a hang
NO_WORKER = "has joined the cluster"  # the 503's message while no route exists


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no HTTP answer (a hang or a broken connection)
    text: str | None = None
    error: str = ""


class Load:
    """`num_clients` threads, each sending one completion after another until stopped."""

    def __init__(self, url: str, num_clients: int = NUM_CLIENTS) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(num_clients)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)

    def _client(self, i: int) -> None:
        body = {"model": "llama", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                outcome = _post(client, self.url, {**body, "prompt": f"client {i} request {n}"})
                outcome.started = started
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status == 503:
                    time.sleep(0.05)  # no route right now: do not spin

    def num_ok_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.status == 200 and start <= o.ended < end)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def complete(url: str, prompt: str) -> str:
    body = {"model": "llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _post(client: httpx.Client, url: str, body: dict) -> Outcome:
    try:
        r = client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as e:
        return Outcome(0.0, time.monotonic(), None, error=f"no answer: {e!r}")
    ended = time.monotonic()
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        return Outcome(0.0, ended, 200, text=choice["text"], error=choice["finish_reason"])
    return Outcome(0.0, ended, r.status_code, error=r.json()["error"]["message"])


def start_router(model: Path, drain_timeout_s: float = 20.0) -> Cluster:
    """The router and its own tokenizer, no worker; a process silent for 2 s is lost."""
    topology = Topology.from_dict(
        {
            "model": str(model),
            "device": "cpu",
            "router": {
                "port": _free_port(17),  # its inboxes are tcp on port + 1, + 2, ...
                "membership": True,
                "drain_timeout_s": drain_timeout_s,
            },
            "kv_transfer": {"backend": "tcp"},
            "scheduler": {"num_pages": 256, "page_size": 4},
            "supervision": {
                "heartbeat_interval_s": 0.5,
                "heartbeat_timeout_s": 2.0,
                "restart_backoff_s": 0.2,
            },
            "security": {"cluster_secret": SECRET},
        }
    )
    return Cluster(topology, log_level="warning", start_timeout_s=120).start()


class Members:
    """`pdserve worker` and `pdserve tokenizer` processes, each started on its own, as on
    another machine."""

    def __init__(self, cluster: Cluster, model: Path, log_dir: Path) -> None:
        self.cluster = cluster
        self.model = model
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, name: str, *flags: str) -> None:
        """A worker of `role` with the scheduler flags every test uses, and `flags`."""
        self._spawn(name, "worker", "--role", role, "--device", "cpu", "--num-pages", "256",
                    "--page-size", "4", *flags)  # fmt: skip

    def start_tokenizer(self, name: str, secret: str = SECRET) -> None:
        self._spawn(name, "tokenizer", secret=secret)

    def _spawn(self, name: str, command: str, *flags: str, secret: str = SECRET) -> None:
        cmd = [sys.executable, "-m", "pdserve.entrypoints.cli", "--log-level", "warning",
               command, "--router", self.cluster.router_inbox, "--model", str(self.model),
               "--name", name, "--heartbeat-interval-s", "0.5", *flags]  # fmt: skip
        env = {**os.environ, "PDSERVE_CLUSTER_SECRET": secret, "OMP_NUM_THREADS": "1"}
        env["PYTHONSAFEPATH"] = "1"
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def members(self) -> dict[str, dict[str, Any]]:
        """Every worker and tokenizer the router lists, by name."""
        info = httpx.get(f"{self.cluster.url}/server_info").json()
        return {m["name"]: m for m in [*info["workers"], *info["tokenizers"]]}

    def wait_routable(self, *names: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in names:
                code = self.procs[name].poll()
                assert code is None, f"{name} exited with {code}: {self.log(name)}"
            members = self.members()
            if all(members.get(name, {}).get("routable") for name in names):
                return
            time.sleep(0.1)
        raise AssertionError(f"{names} not routable in {timeout_s} s: {members}")

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()[-3000:]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def assert_ended_clearly(outcomes: list[Outcome], allowed: tuple[str, ...]) -> None:
    """Each ended with a result, a 503 naming the missing role, or a 500 naming a lost process
    from `allowed`; none hung."""
    for o in outcomes:
        assert o.status is not None, o.error  # a hang (client timeout) or a dropped connection
        if o.status == 200:
            assert o.text is not None and o.error == "length"
        elif o.status == 503:
            assert NO_WORKER in o.error, o.error
        else:
            assert o.status == 500 and any(n in o.error for n in allowed), (o.status, o.error)


def wait_pages_back(url: str, names: tuple[str, ...], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = {w["name"]: w for w in httpx.get(f"{url}/server_info").json()["workers"]}
        pages = {n: (workers[n]["num_free_pages"], workers[n]["num_total_pages"]) for n in names}
        if all(free == total for free, total in pages.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"KV pages not all back: {pages}")


def summary(outcomes: list[Outcome]) -> str:
    bad = [(o.status, o.error) for o in outcomes if o.status != 200]
    return f"{len(outcomes)} requests, not ok: {bad[:10]}"
