"""Native routes: /generate in SGLang's shapes, health, info, flush_cache and /metrics."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import ALT_TEXT, MODEL, PROMPT_TOKENS, Cluster, wait_until

from pdserve.protocol import FlushCache


def _post(cluster: Cluster, path: str, body: dict, auth: dict[str, str]) -> httpx.Response:
    return httpx.post(cluster.url + path, json=body, headers=auth, timeout=10)


def test_generate_single_text(cluster: Cluster, auth: dict[str, str]) -> None:
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}
    out = _post(cluster, "/generate", body, auth).json()
    assert out["text"] == "Hello world!"
    assert out["output_ids"] == [100, 101, 102]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": 2}
    assert meta["prompt_tokens"] == PROMPT_TOKENS and meta["completion_tokens"] == 3
    assert meta["e2e_latency"] >= 0 and meta["id"]
    req = cluster.find_req(lambda r: r.rid == meta["id"])
    assert req.sampling["max_new_tokens"] == 8


def test_generate_batch_of_input_ids_returns_a_list_with_logprobs(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    body = {
        "input_ids": [[1, 2, 3], [4, 5]],
        "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 1}],
        "return_logprob": True,
        "top_logprobs_num": 2,
    }
    outs = _post(cluster, "/generate", body, auth).json()
    assert [o["output_ids"] for o in outs] == [[100, 101], [100]]
    assert outs[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert outs[0]["meta_info"]["output_token_logprobs"] == [
        [-0.5, 100, "Hello"],
        [-1.5, 101, " world"],
    ]
    assert outs[0]["meta_info"]["output_top_logprobs"][0] == [
        [-0.5, 100, "Hello"],
        [-2.0, 7, ALT_TEXT],
    ]
    reqs = [cluster.find_req(lambda r, o=o: r.rid == o["meta_info"]["id"]) for o in outs]
    assert [r.input_ids for r in reqs] == [[1, 2, 3], [4, 5]]
    assert all(r.return_text for r in reqs)


def test_generate_logprobs_without_texts_or_top_alternatives(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    body = {
        "text": "hi",
        "return_logprob": True,
        "return_text_in_logprobs": False,
        "top_logprobs_num": 2,
    }
    meta = _post(cluster, "/generate", body, auth).json()["meta_info"]
    assert meta["output_token_logprobs"][:2] == [[-0.5, 100, None], [-1.5, 101, None]]
    assert meta["output_top_logprobs"][0] == [[-0.5, 100, None], [-2.0, 7, None]]
    body = {"text": "hi", "return_logprob": True}  # no top_logprobs_num: no top alternatives
    meta = _post(cluster, "/generate", body, auth).json()["meta_info"]
    assert meta["output_token_logprobs"][0] == [-0.5, 100, "Hello"]
    assert "output_top_logprobs" not in meta


def test_generate_stream_sends_cumulative_text(cluster: Cluster, auth: dict[str, str]) -> None:
    body = {"text": "hi", "stream": True}
    with httpx.stream("POST", cluster.url + "/generate", json=body, headers=auth) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["text"] for c in chunks] == ["Hello", "Hello world", "Hello world!"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_generate_n_fans_out_with_user_rid(cluster: Cluster, auth: dict[str, str]) -> None:
    body = {"text": "hi", "rid": "mine", "sampling_params": {"n": 3, "seed": 5}}
    outs = _post(cluster, "/generate", body, auth).json()
    assert [o["meta_info"]["id"] for o in outs] == ["mine-0", "mine-1", "mine-2"]
    seeds = [
        cluster.find_req(lambda r, k=k: r.rid == f"mine-{k}").sampling["seed"] for k in range(3)
    ]
    assert seeds == [5, 6, 7]


def test_health_generate_runs_one_token(cluster: Cluster, auth: dict[str, str]) -> None:
    resp = httpx.get(cluster.url + "/health_generate", headers=auth)
    assert resp.status_code == 200
    req = cluster.find_req(lambda r: r.rid.startswith("health-"))
    assert req.sampling["max_new_tokens"] == 1


def test_info_routes(cluster: Cluster, auth: dict[str, str]) -> None:
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(cluster.url + path, headers=auth).json()
        assert info["model_path"] == f"/models/{MODEL}" and info["is_generation"] is True
        assert info["tokenizer_path"] == f"/models/{MODEL}"
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(cluster.url + path, headers=auth).json()
        assert info["topology"] == {"prefill": 2, "decode": 2}
        workers = {w["name"]: w for w in info["workers"]}
        assert set(workers) == {"prefill0", "prefill1", "decode0", "decode1"}
        assert workers["decode1"]["healthy"] is True
        assert workers["decode1"]["num_free_pages"] == 90
        assert workers["decode1"]["num_total_pages"] == 100


def test_flush_cache_reaches_every_worker(cluster: Cluster, auth: dict[str, str]) -> None:
    resp = httpx.post(cluster.url + "/flush_cache", headers=auth)
    assert resp.status_code == 200
    for worker in cluster.workers.values():
        wait_until(lambda w=worker: w.of_type(FlushCache), 2.0)


def _samples(cluster: Cluster, auth: dict[str, str]) -> dict[tuple[str, tuple], float]:
    text = httpx.get(cluster.url + "/metrics", headers=auth).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_and_worker_state(
    cluster: Cluster, auth: dict[str, str]
) -> None:
    def value(samples: dict, name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    wait_until(lambda: len(cluster.router.tracker) == 0, 3.0)
    before = _samples(cluster, auth)
    for _ in range(3):
        _post(cluster, "/v1/completions", {"prompt": "count me", "max_tokens": 8}, auth)
    _post(cluster, "/v1/completions", {"prompt": "count me", "max_tokens": 2}, auth)
    _post(cluster, "/v1/completions", {"prompt": "TOO_LONG"}, auth)
    after = _samples(cluster, auth)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    m = {"model_name": MODEL}
    assert delta("pdserve_requests_total", finish_reason="stop", **m) == 3
    assert delta("pdserve_requests_total", finish_reason="length", **m) == 1
    assert delta("pdserve_requests_total", finish_reason="error", **m) == 1
    assert delta("pdserve_generation_tokens_total", **m) == 3 * 3 + 2
    assert delta("pdserve_prompt_tokens_total", **m) == 4 * PROMPT_TOKENS
    assert delta("pdserve_cached_tokens_total", **m) == 4 * 2
    assert delta("pdserve_e2e_request_latency_seconds_count", **m) == 5
    assert delta("pdserve_time_to_first_token_seconds_count", **m) == 4
    assert delta("pdserve_inter_token_latency_seconds_count", **m) == 3 * 2 + 1
    w = {"worker": "decode0", "role": "decode"}
    assert value(after, "pdserve_worker_healthy", **w) == 1.0
    assert value(after, "pdserve_kv_pages_total", **w) == 100
    assert value(after, "pdserve_kv_pages_used", **w) == 10
    assert value(after, "pdserve_cache_hit_rate", **w) == 0.25
    assert value(after, "pdserve_kv_transfers_total", **w) == 4
    assert value(after, "pdserve_kv_transfer_seconds_total", **w) == 0.5
    assert value(after, "pdserve_kv_transfer_latency_seconds", **w) == 0.125
