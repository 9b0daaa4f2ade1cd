"""Vertex AI's prediction route over /generate, and the AIP_* variables that move it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from router_fakes import API_KEY, Cluster, start_cluster

from pdserve.env import VertexEnv, vertex_env

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def vertex_cluster() -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIP_PREDICT_ROUTE", "/v1/endpoints/42:predict")
        mp.setenv("AIP_HEALTH_ROUTE", "/ping")
        c = start_cluster()
    yield c
    c.stop()


def test_vertex_generate_answers_one_prediction_per_instance(vertex_cluster: Cluster) -> None:
    body = {
        "instances": [{"text": "The capital of France is"}, {"text": "2 + 2 ="}],
        "parameters": {"sampling_params": {"max_new_tokens": 2, "temperature": 0}},
    }
    res = httpx.post(f"{vertex_cluster.url}/vertex_generate", json=body, headers=AUTH, timeout=10)
    assert res.status_code == 200, res.text
    predictions = res.json()["predictions"]
    assert [p["text"] for p in predictions] == ["Hello world", "Hello world"]
    assert predictions[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    prompts = {r.text for r in vertex_cluster.requests()}
    assert {"The capital of France is", "2 + 2 ="} <= prompts


def test_vertex_routes_follow_the_aip_variables(vertex_cluster: Cluster) -> None:
    body = {"instances": [{"input_ids": [1, 2, 3]}]}
    url = f"{vertex_cluster.url}/v1/endpoints/42:predict"
    res = httpx.post(url, json=body, headers=AUTH, timeout=10)
    assert res.status_code == 200, res.text
    assert res.json()["predictions"][0]["output_ids"]
    ping = httpx.get(f"{vertex_cluster.url}/ping", timeout=5)  # Vertex probes without a key
    assert ping.status_code == 200 and ping.json()["status"] == "ok"
    refused = httpx.post(url, json=body, timeout=5)  # the predict route still needs the key
    assert refused.status_code == 401


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [{"prompt": "x"}]}, "each instance needs one of"),
        ({"instances": [{"text": "a"}, {"input_ids": [1]}]}, "have no 'text'"),
        ({"instances": [{"text": "a"}], "parameters": {"stream": True}}, "stream"),
        ({"instances": [{"text": "a"}], "parameters": {"sampling_params": 3}}, "sampling_params"),
    ],
)
def test_vertex_generate_refuses_bad_bodies(
    vertex_cluster: Cluster, body: dict, message: str
) -> None:
    res = httpx.post(f"{vertex_cluster.url}/vertex_generate", json=body, headers=AUTH, timeout=10)
    assert res.status_code == 400 and message in res.json()["error"]["message"], res.text


def test_no_instances_is_no_predictions(vertex_cluster: Cluster) -> None:
    res = httpx.post(
        f"{vertex_cluster.url}/vertex_generate", json={"instances": []}, headers=AUTH, timeout=5
    )
    assert res.json() == {"predictions": []}


def test_vertex_env_is_typed_and_checked() -> None:
    assert vertex_env({}) == VertexEnv("/vertex_generate", None, None)
    env = {"AIP_PREDICT_ROUTE": "/p", "AIP_HEALTH_ROUTE": "/h", "AIP_HTTP_PORT": "8080"}
    assert vertex_env(env) == VertexEnv("/p", "/h", 8080)
    with pytest.raises(ValueError, match="AIP_HTTP_PORT='http'"):
        vertex_env({"AIP_HTTP_PORT": "http"})
    with pytest.raises(ValueError, match="AIP_PREDICT_ROUTE='predict'"):
        vertex_env({"AIP_PREDICT_ROUTE": "predict"})
