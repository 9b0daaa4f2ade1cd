"""Every request ends: client disconnects abort it everywhere, lost workers end it with an error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from router_fakes import API_KEY, MODEL, Cluster, start_cluster, wait_until

from pdserve.protocol import Abort, GenerateReq

CHAT = "/v1/chat/completions"


def _aborted_everywhere(cluster: Cluster, rid: str) -> bool:
    req = cluster.find_req(lambda r: r.rid == rid)
    holders = [cluster.tokenizer_of(rid), cluster.workers[f"decode{req.decode_idx}"]]
    holders.append(cluster.workers[f"prefill{req.prefill_idx}"])
    return all(any(m.rid == rid for m in peer.of_type(Abort)) for peer in holders)


def _next_data(lines: Iterator[str]) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: ") :])
    raise AssertionError("no event")


def test_client_disconnect_mid_stream_aborts_on_tokenizer_prefill_and_decode(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    with httpx.stream("POST", cluster.url + CHAT, json=body, headers=auth) as response:
        assert response.status_code == 200
        rid = _next_data(response.iter_lines())["id"].removeprefix("chatcmpl-")
    wait_until(lambda: _aborted_everywhere(cluster, rid), 3.0)
    others = [w for name, w in cluster.workers.items() if not _holds(cluster, rid, name)]
    assert not any(m.rid == rid for w in others for m in w.of_type(Abort))
    wait_until(lambda: rid not in cluster.router.tracker, 2.0)


def _holds(cluster: Cluster, rid: str, worker: str) -> bool:
    req = cluster.find_req(lambda r: r.rid == rid)
    return worker in (f"decode{req.decode_idx}", f"prefill{req.prefill_idx}")


def test_non_streaming_client_gone_aborts_the_request(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    body = {"model": MODEL, "prompt": "HANG non-stream"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.url + "/v1/completions", json=body, headers=auth, timeout=0.5)
    req = cluster.find_req(lambda r: r.text == "HANG non-stream")
    wait_until(lambda: _aborted_everywhere(cluster, req.rid), 3.0)


def test_abort_request_ends_a_running_generate(cluster: Cluster, auth: dict[str, str]) -> None:
    body = {"text": "HANG abort me", "rid": "user-rid-1", "stream": True}
    with httpx.stream("POST", cluster.url + "/generate", json=body, headers=auth) as response:
        lines = response.iter_lines()  # one iterator: dropping it would close the stream
        first = _next_data(lines)
        assert first["meta_info"]["id"] == "user-rid-1"
        assert first["meta_info"]["finish_reason"] is None
        resp = httpx.post(cluster.url + "/abort_request", json={"rid": "user-rid-1"}, headers=auth)
        assert resp.status_code == 200 and resp.json()["num_aborted"] == 1
        last = _next_data(lines)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    wait_until(lambda: _aborted_everywhere(cluster, "user-rid-1"), 3.0)


def test_worker_marked_unhealthy_ends_inflight_stream_with_error_event() -> None:
    cluster = start_cluster()
    try:
        client = openai.OpenAI(
            base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10
        )
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "HANG"}], stream=True
        )
        first = next(iter(stream))
        rid = first.id.removeprefix("chatcmpl-")
        req = cluster.find_req(lambda r: r.rid == rid)
        started = time.monotonic()
        cluster.router.mark_unhealthy(f"decode{req.decode_idx}", "exited with code -9")
        with pytest.raises(openai.APIError) as info:
            list(stream)
        assert time.monotonic() - started < 3.0
        assert f"decode{req.decode_idx}" in str(info.value)
        tokenizer = cluster.tokenizer_of(rid)
        wait_until(lambda: any(m.rid == rid for m in tokenizer.of_type(Abort)), 3.0)
        assert httpx.get(cluster.url + "/health").status_code == 503
        # new requests go around the dead worker
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
        later = cluster.find_req(lambda r: r.rid == resp.id.removeprefix("chatcmpl-"))
        assert later.decode_idx != req.decode_idx
    finally:
        cluster.stop()


def test_missing_load_reports_fail_inflight_requests_with_500() -> None:
    cluster = start_cluster()
    try:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        for name in ("decode0", "decode1"):
            cluster.workers[name].reporting.clear()
        started = time.monotonic()
        body = {"model": MODEL, "prompt": "HANG lost"}
        resp = httpx.post(cluster.url + "/v1/completions", json=body, headers=auth, timeout=10)
        assert resp.status_code == 500
        err = resp.json()["error"]
        assert err["type"] == "server_error" and "no load report" in err["message"]
        assert time.monotonic() - started < 4.0
        assert httpx.get(cluster.url + "/health").status_code == 503
        resp = httpx.post(cluster.url + "/v1/completions", json=body, headers=auth)
        assert resp.status_code == 503  # no healthy decode worker left
        health = httpx.get(cluster.url + "/health_generate", headers=auth)
        assert health.status_code == 503
        cluster.workers["decode1"].reporting.set()
        wait_until(lambda: cluster.router.can_serve(), 3.0)
        resp = httpx.post(cluster.url + "/v1/completions", json={"prompt": "back"}, headers=auth)
        assert resp.status_code == 200
    finally:
        cluster.stop()


def test_request_timeout_aborts_and_ends_the_request() -> None:
    cluster = start_cluster(request_timeout_s=0.5)
    try:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        body = {"text": "HANG forever"}
        resp = httpx.post(cluster.url + "/generate", json=body, headers=auth, timeout=10)
        assert resp.status_code == 504 and "timed out" in resp.json()["error"]["message"]
        req = cluster.find_req(lambda r: isinstance(r, GenerateReq) and r.text == "HANG forever")
        wait_until(lambda: _aborted_everywhere(cluster, req.rid), 3.0)
    finally:
        cluster.stop()
