"""Fake peers for the router tests: a router under uvicorn, its peers on real ZeroMQ sockets.

FakeTokenizer answers each GenerateReq with scripted ReqOutputs, chosen by a word in the prompt:
  TOO_LONG  -> an error (as a tokenizer refusing a prompt over the context length)
  HANG      -> one delta, then nothing until aborted
  SLOW      -> a delta every 0.1 s, 100 of them
  otherwise -> "Hello", " world", "!" (cut at max_new_tokens; finish length if cut, else stop)
and answers an Abort with a final abort output, as the real one does, and sends a Heartbeat every
0.1 s while `beating` is set. FakeWorker records what reaches its inbox and sends LoadReports every
0.1 s while `reporting` is set.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
import zmq

from pdserve import protocol
from pdserve.ipc import new_ipc_address
from pdserve.protocol import Abort, Finish, GenerateReq, Heartbeat, LoadReport, ReqOutput
from pdserve.router.app import build_app
from pdserve.router.router import Router

API_KEY = "sk-test-key"
MODEL = "tiny-llama"
WORDS = ["Hello", " world", "!"]
THINK_WORDS = ["<think>", "\nHmm,", " Paris", "</", "think>", "\n\n", "Paris", "."]  # THINK prompts
PROMPT_TOKENS = 7
CACHED_TOKENS = 2
ALT_TEXT = "é"  # the text of id 7, every token's second most likely alternative


def prompt_of(req: GenerateReq) -> str:
    if req.text is not None:
        return req.text
    if req.messages is not None:
        return " ".join(str(m.get("content", "")) for m in req.messages)
    return " ".join(str(t) for t in req.input_ids or [])


class FakePeer:
    """A thread with a PULL inbox (bound, as a real process's) and a PUSH to the router."""

    def __init__(self, inbox: str, router_inbox: str) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(inbox)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(router_inbox)
        self.received: list[Any] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def send(self, msg: Any) -> None:
        with self.lock:
            self.push.send(protocol.encode(msg))

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.tick()
            if self.pull.poll(20):
                msg = protocol.decode(self.pull.recv())
                self.received.append(msg)
                self.handle(msg)
        self.pull.close(0)
        self.push.close(0)
        self.ctx.term()

    def tick(self) -> None:
        pass

    def handle(self, msg: Any) -> None:
        pass

    def close(self) -> None:
        if not self.thread.is_alive():  # never started: close the sockets here
            self.pull.close(0)
            self.push.close(0)
            self.ctx.term()
            return
        self.stop_event.set()
        self.thread.join(5)

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in list(self.received) if isinstance(m, cls)]


class FakeTokenizer(FakePeer):
    def __init__(self, inbox: str, router_inbox: str, name: str = "tokenizer0") -> None:
        super().__init__(inbox, router_inbox)
        self.scheduled: list[tuple[float, ReqOutput]] = []  # (due time, output), this thread only
        self.live: set[str] = set()
        self.name = name
        self.beating = threading.Event()
        self.beating.set()
        self._next_beat = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if self.beating.is_set() and now >= self._next_beat:
            self._next_beat = now + 0.1
            self.send(Heartbeat(self.name, pid=os.getpid()))
        due = [item for item in self.scheduled if item[0] <= now]
        self.scheduled = [item for item in self.scheduled if item[0] > now]
        for _, out in due:
            if out.rid in self.live:
                self.send(out)
                if out.finish is not None or out.error is not None:
                    self.live.discard(out.rid)

    def handle(self, msg: Any) -> None:
        if isinstance(msg, GenerateReq):
            self.live.add(msg.rid)
            now = time.monotonic()
            self.scheduled += [(now + delay, out) for delay, out in script(msg)]
        elif isinstance(msg, Abort) and msg.rid in self.live:
            self.live.discard(msg.rid)
            finish = Finish.abort(msg.message)
            self.send(ReqOutput(msg.rid, "", [], finish))


def script(req: GenerateReq) -> list[tuple[float, ReqOutput]]:
    """(delay, output) pairs answering one request."""
    prompt = prompt_of(req)
    if "TOO_LONG" in prompt:
        error = f"prompt has 9000 tokens, more than max_context_len={req.max_context_len}"
        return [(0.0, ReqOutput(req.rid, "", [], None, error=error))]
    max_new = req.sampling["max_new_tokens"]
    if max_new == 0 and "HANG" not in prompt:  # nothing to generate: just the finish
        done = ReqOutput(req.rid, "", [], Finish.at_length(0), prompt_tokens=PROMPT_TOKENS)
        return [(0.0, done)]
    words = THINK_WORDS if "THINK" in prompt else WORDS
    num = 100 if "SLOW" in prompt else (1 if "HANG" in prompt else min(len(words), max_new))
    outs = []
    for k in range(num):
        text = words[k % len(words)]
        finish = None
        if k == num - 1 and "HANG" not in prompt:
            finish = Finish.at_length(max_new) if num == max_new else Finish.stop(2)
        out = ReqOutput(
            req.rid, text, [100 + k], finish, prompt_tokens=PROMPT_TOKENS,
            completion_tokens=k + 1, cached_tokens=CACHED_TOKENS,
        )  # fmt: skip
        if req.return_logprob:
            out.logprobs = [-0.5 - k]
            out.token_texts = [text]
            out.top_logprobs = [[[100 + k, -0.5 - k], [7, -2.0]][: max(req.top_logprobs_num, 1)]]
            out.top_token_texts = [[text, ALT_TEXT][: len(out.top_logprobs[0])]]
        if req.echo and k == 0:
            out.prompt_text = prompt
        outs.append((0.1 * k if "SLOW" in prompt else 0.0, out))
    return outs


class FakeWorker(FakePeer):
    def __init__(self, name: str, role: str, inbox: str, router_inbox: str) -> None:
        super().__init__(inbox, router_inbox)
        self.name = name
        self.role = role
        self.reporting = threading.Event()
        self.reporting.set()
        self.num_running = 0
        self.num_free_pages = 90
        self.kv_bytes = 0
        self._next_report = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if self.reporting.is_set() and now >= self._next_report:
            self._next_report = now + 0.1
            report = LoadReport(
                self.name, self.role, self.num_running, 0, self.num_free_pages, 100, 10, 0.25,
                3.0, kv_transfer_bytes=self.kv_bytes, kv_transfer_seconds=0.5,
                num_kv_transfers=4,
            )  # fmt: skip
            self.send(report)


@dataclass
class Cluster:
    router: Router
    url: str
    tokenizers: list[FakeTokenizer]
    workers: dict[str, FakeWorker]
    server: uvicorn.Server
    thread: threading.Thread
    peers: list[FakePeer] = field(default_factory=list)

    def requests(self) -> list[GenerateReq]:
        return [m for t in self.tokenizers for m in t.of_type(GenerateReq)]

    def find_req(self, match: Callable[[GenerateReq], bool]) -> GenerateReq:
        found = [r for r in self.requests() if match(r)]
        assert found, "no matching GenerateReq reached a tokenizer"
        return found[-1]

    def tokenizer_of(self, rid: str) -> FakeTokenizer:
        return next(t for t in self.tokenizers if any(r.rid == rid for r in t.of_type(GenerateReq)))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for peer in self.peers:
            peer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s} s")


def start_cluster(**spec_overrides: Any) -> Cluster:
    router_inbox = new_ipc_address("test-router")
    tok_inboxes = [new_ipc_address(f"test-tok{i}") for i in range(2)]
    roles = [("prefill0", "prefill", 0), ("prefill1", "prefill", 1), ("decode0", "decode", 0),
             ("decode1", "decode", 1)]  # fmt: skip
    worker_specs = [
        {"name": n, "role": r, "idx": i, "inbox": new_ipc_address(f"test-{n}")} for n, r, i in roles
    ]
    port = free_port()
    spec = {
        "host": "127.0.0.1", "port": port, "api_key": API_KEY, "model_name": MODEL,
        "model_path": f"/models/{MODEL}", "inbox": router_inbox, "tokenizer_inboxes": tok_inboxes,
        "workers": worker_specs, "routing_policy": "round_robin", "max_context_len": 4096,
        "liveness_timeout_s": 1.0, "topology": {"prefill": 2, "decode": 2}, "default_max_tokens": 64,
        "health_generate_timeout_s": 2.0,
    }  # fmt: skip
    spec.update(spec_overrides)
    tokenizers = [
        FakeTokenizer(a, router_inbox, f"tokenizer{i}") for i, a in enumerate(tok_inboxes)
    ]
    workers = {
        w["name"]: FakeWorker(w["name"], w["role"], w["inbox"], router_inbox) for w in worker_specs
    }
    peers: list[FakePeer] = [*tokenizers, *workers.values()]
    for peer in peers:
        peer.start()
    router = Router(spec)
    config = uvicorn.Config(build_app(router), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    cluster = Cluster(
        router, f"http://127.0.0.1:{port}", tokenizers, workers, server, thread, peers
    )
    try:
        wait_until(lambda: server.started and router.is_ready(), 10.0)
    except AssertionError:
        cluster.stop()
        raise
    return cluster
