"""Garbage and wrongly-typed frames sent to every internal socket of running clusters (router,
tokenizer and worker inboxes of each role, the tcp KV data socket): every process survives and
the cluster still serves a request afterwards."""

from __future__ import annotations

import glob
import os
import time

import httpx
import msgpack
import pytest
import zmq

from pdserve import protocol
from pdserve.entrypoints.launch import Cluster
from pdserve.protocol import Finish

pytestmark = pytest.mark.slow


def _hostile_frames() -> list[bytes]:
    """Bytes that are not messages, and messages whose fields hold the wrong types."""
    p = protocol
    wrong_types = [
        p.GenerateReq(rid=1, sampling="greedy", text=["hi"], decode_idx="0"),
        p.TokenOut(rids="r", token_ids=[1, 2], first_idx=None, finish=["stop"]),
        p.TokenOut(rids=["r"], token_ids=[[1]], first_idx=[0], finish=[Finish("done")]),
        p.ReqOutput(rid=None, text_delta=b"x", output_ids={}, finish=3),
        p.LoadReport(
            worker="prefill0",
            role="prefill",
            num_running="1",
            num_queued=0,
            num_free_pages=0,
            num_total_pages=0,
            num_cached_pages=0,
            cache_hit_rate=None,
            step_time_ms=0.0,
        ),
        p.TokenizedReq(rid="r", input_ids=["1"], sampling={}, tokenizer_idx=0),
        p.PrefillTask(
            rid="r",
            input_ids=[1],
            sampling={},
            tokenizer_idx=0,
            decode_idx=0,
            dst_pages=[0.5],
            kv_handshake="x",
        ),
        p.KVReady(rid="r", first_token="a", cached_tokens=0),
        p.Abort(rid=7, abort_all="yes"),
        p.Shutdown(grace_s="0"),
        p.Ready(name=None, info=[]),
        p.KVChunk(rid="r", dst_pages=["0"], dtype="float32", shape=[1], data="x"),
    ]
    garbage = [
        b"",
        b"\x01\x02",
        b"\xc1",
        os.urandom(256),
        msgpack.packb([999, []]),
        msgpack.packb([1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]),
        b"\x91" * 100_000 + b"\xc0",
        msgpack.packb(msgpack.ExtType(1, b"\x00" * 64)),
    ]
    return garbage + [p.encode(m) for m in wrong_types]


def _push(address: str, frames: list[bytes]) -> None:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(address)
    for frame in frames:
        sock.send(frame)
    sock.close(linger=5000)


def _address(cluster: Cluster, target: str) -> str:
    if target == "decode0-kv":  # the tcp backend's data socket (ipc:// transport on one node)
        paths = glob.glob(os.path.join(cluster._socket_dir, "decode0-kv-*.sock"))
        assert len(paths) == 1, paths
        return f"ipc://{paths[0]}"
    return next(c.inbox for c in cluster.children if c.name == target)


def _pids(cluster: Cluster) -> dict[str, int]:
    """Each child's pid while it runs (a restarted child would show a new pid)."""
    return {c.name: c.proc.pid for c in cluster.children if c.proc.poll() is None}


def _attack_then_serve(cluster: Cluster, target: str) -> None:
    before = _pids(cluster)
    assert len(before) == len(cluster.children)
    _push(_address(cluster, target), _hostile_frames())
    time.sleep(0.3)  # let the process read them before it is asked to serve
    body = {"model": "llama", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
    res = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60)
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["completion_tokens"] == 4
    assert _pids(cluster) == before, "a process died (or was restarted)"


@pytest.mark.parametrize("target", ["router", "tokenizer0", "prefill0", "decode0", "decode0-kv"])
def test_hostile_frames_leave_a_pd_cluster_serving(pd_cluster: Cluster, target: str) -> None:
    _attack_then_serve(pd_cluster, target)


def test_hostile_frames_leave_a_mixed_worker_serving(mixed_cluster: Cluster) -> None:
    _attack_then_serve(mixed_cluster, "mixed0")
