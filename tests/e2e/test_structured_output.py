"""Structured output end to end on CPU, on a mixed worker and on prefill + decode over tcp (the
session's clusters): every output of twenty JSON schemas and ten regexes validates through the
openai client (response_format, SGLang's regex extra, streaming, n > 1) and through /generate;
a bad grammar is a 400 with OpenAI's error body naming it, found before the request is queued;
random bad response_format values get a 400, never a 5xx."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structured_output_cases import (
    CASES,
    MAX_TOKENS,
    Case,
    check_output,
    response_format,
    sampling_fields,
)

from pdserve.entrypoints.launch import Cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
]

MODEL = "llama"  # the tiny model's directory name is its served name
PROMPT = "Answer in the requested format:"


@pytest.fixture(params=["mixed_cluster", "pd_cluster"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(request.param)


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)


def in_flight(cluster: Cluster) -> int:
    return httpx.get(f"{cluster.url}/server_info", timeout=5).json()["num_requests_in_flight"]


def openai_texts(c: openai.OpenAI, case: Case, seed: int) -> list[str]:
    """The case through the openai client: a schema as chat's response_format (every other one
    streamed, two choices for the first), a regex as completions' SGLang extra `regex`."""
    common: dict[str, Any] = {"model": MODEL, "temperature": 1.0, "seed": seed,
                              "max_tokens": MAX_TOKENS}  # fmt: skip
    if case.kind == "regex":
        res = c.completions.create(prompt=PROMPT, extra_body={"regex": case.grammar}, **common)
        assert res.choices[0].finish_reason == "stop"
        return [res.choices[0].text]
    messages = [{"role": "user", "content": PROMPT}]
    fmt = response_format(case)
    if CASES.index(case) % 2:
        chunks = c.chat.completions.create(
            messages=messages, response_format=fmt, stream=True, **common
        )
        return ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)]
    n = 2 if case is CASES[0] else 1
    res = c.chat.completions.create(messages=messages, response_format=fmt, n=n, **common)
    assert all(choice.finish_reason == "stop" for choice in res.choices)
    return [choice.message.content or "" for choice in res.choices]


def test_openai_client_outputs_validate(cluster: Cluster) -> None:
    c = client(cluster)
    seed = 3 if cluster.topology.prefill else 2  # prefill + decode, or mixed
    with ThreadPoolExecutor(len(CASES)) as pool:  # one batch on the worker
        results = list(pool.map(lambda case: openai_texts(c, case, seed), CASES))
    for case, texts in zip(CASES, results):
        for text in texts:
            check_output(case, text)
    assert len(results[0]) == 2
    res = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], seed=seed,
        response_format={"type": "json_object"}, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    assert isinstance(json.loads(res.choices[0].message.content or ""), dict)


def test_generate_outputs_validate(cluster: Cluster) -> None:
    params = [
        {**sampling_fields(case), "temperature": 1.0, "seed": 7, "max_new_tokens": MAX_TOKENS}
        for case in CASES
    ]
    body = {"text": [PROMPT] * len(CASES), "sampling_params": params}
    resp = httpx.post(f"{cluster.url}/generate", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    for case, item in zip(CASES, resp.json()):
        assert item["meta_info"]["finish_reason"]["type"] == "stop", (case.name, item)
        check_output(case, item["text"])
    email = next(c for c in CASES if c.name == "regex-email")
    params = {**sampling_fields(email), "temperature": 1.0, "n": 3, "max_new_tokens": 40}
    resp = httpx.post(
        f"{cluster.url}/generate", json={"text": PROMPT, "sampling_params": params}, timeout=60
    )
    texts = [item["text"] for item in resp.json()]
    for text in texts:
        check_output(email, text)
    assert len(set(texts)) > 1  # each choice has its own matcher and draws


def test_tokens_are_sampled_until_max_tokens_when_the_grammar_allows_more(
    cluster: Cluster,
) -> None:
    res = client(cluster).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, seed=1, extra_body={"regex": "[0-9]{200}"}
    )
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 8
    assert re.fullmatch("[0-9]+", res.choices[0].text)


def test_vllms_guided_fields_through_the_openai_client(cluster: Cluster) -> None:
    c = client(cluster)
    choices = ["yes (sure)", "no.", "a|b"]
    res = c.completions.create(
        model=MODEL, prompt=PROMPT, n=4, seed=6, temperature=1.0, max_tokens=MAX_TOKENS,
        extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert all(choice.text in choices and choice.finish_reason == "stop" for choice in res.choices)
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    res2 = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], seed=6, temperature=1.0,
        max_tokens=MAX_TOKENS, extra_body={"structured_outputs": {"json": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(res2.choices[0].message.content or ""), schema)


def test_a_structural_tag_holds_its_tags_and_frees_the_rest(cluster: Cluster) -> None:
    """response_format of type structural_tag through the openai client: xgrammar's `format`
    (a tag from the start: every answer is exactly it) and SGLang's `structures` + `triggers`
    (free text, but each trigger opens a tag whose JSON validates)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    content = {"type": "json_schema", "json_schema": schema}
    forced = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>",
              "content": content, "end": "</answer>"}}  # fmt: skip
    c = client(cluster)
    res = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], n=3, seed=4,
        temperature=1.0, max_tokens=MAX_TOKENS, response_format=forced,  # type: ignore[arg-type]
    )  # fmt: skip
    for choice in res.choices:
        assert choice.finish_reason == "stop", choice
        found = re.fullmatch(r"<answer>(.*)</answer>", choice.message.content or "", re.DOTALL)
        assert found, choice.message.content
        jsonschema.validate(json.loads(found[1]), schema)
    triggered = {"type": "structural_tag", "triggers": ["<n="],
                 "structures": [{"begin": "<n=1>", "schema": schema, "end": "</n>"}]}  # fmt: skip
    res = c.completions.create(
        model=MODEL, prompt=PROMPT, n=4, seed=4, temperature=1.0, max_tokens=MAX_TOKENS,
        extra_body={"response_format": triggered},
    )  # fmt: skip
    for choice in res.choices:
        for call in choice.text.split("<n=")[1:]:  # each trigger opened the one tag
            assert call.startswith("1>"), choice.text
            if "</n>" in call:
                jsonschema.validate(json.loads(call[2 : call.index("</n>")]), schema)


def test_a_grammar_after_the_thinking_runs_on_the_workers(cluster: Cluster) -> None:
    """What the router asks of a constrained chat when it runs a reasoning parser: the worker
    compiles the thinking + answer grammar (tests/worker/test_grammar_after_reasoning.py): each
    output is the qwen3 shape (optional <think>...</think>, blanks, then the answer), and
    deepseek_r1's outputs start free."""
    params = {"regex": "[0-9]{2,4}", "grammar_after_reasoning": "qwen3", "temperature": 1.0,
              "n": 8, "seed": 5, "max_new_tokens": 24}  # fmt: skip
    body = {"text": PROMPT, "sampling_params": params}
    resp = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    for item in resp.json():
        text, reason = item["text"], item["meta_info"]["finish_reason"]["type"]
        thinking, closed, answer = text.partition("</think>")
        if not closed:  # no thinking, or still thinking when cut
            if reason == "stop" or not thinking.startswith("<"):
                assert re.fullmatch(r"[ \t\r\n]{0,8}[0-9]{2,4}", text), item
            else:
                assert thinking.startswith("<think>") or "<think>".startswith(thinking), item
            continue
        assert thinking.startswith("<think>"), item
        ending = "[0-9]{2,4}" if reason == "stop" else "[0-9]{0,4}"
        assert re.fullmatch(r"[ \t\r\n]{0,8}" + ending, answer), item
    # deepseek_r1: the output starts inside the thinking, free text until the model closes it
    # (the tiny model's random weights do not in 24 tokens): not held to the answer's digits.
    body["sampling_params"] = {**params, "grammar_after_reasoning": "deepseek_r1"}
    resp = httpx.post(f"{cluster.url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    items = resp.json()
    assert all(item["meta_info"]["finish_reason"]["type"] == "length" for item in items), items
    assert all("</think>" not in item["text"] for item in items), items
    assert any(re.search(r"[^0-9 \t\r\n]", item["text"]) for item in items), items


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integr"}}}


def test_a_bad_schema_or_regex_is_a_400_naming_it(cluster: Cluster) -> None:
    c = client(cluster)
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": BAD_SCHEMA}}
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=bad
        )
    err = info.value.body
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == "json_schema" and err["type"] == "invalid_request_error"
    assert (
        err["message"].startswith("json_schema='") and 'Unsupported type "integr"' in err["message"]
    )
    body = {"text": "hi", "sampling_params": {"regex": "(unclosed", "max_new_tokens": 4}}
    resp = httpx.post(f"{cluster.url}/generate", json=body, timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "regex"
    assert error["message"] == (
        "regex='(unclosed' is invalid: Regex parsing error at position 10: "
        "The parenthesis is not closed."
    )
    assert in_flight(cluster) == 0


# ---- fuzzing response_format ------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)
KEYWORDS = {
    "type": st.sampled_from(["strin", "objekt", 5, None, [], ["string", 3], "integer", "array"]),
    "properties": JSON,
    "required": JSON,
    "items": JSON,
    "enum": JSON,
    "minimum": JSON,
    "maxLength": st.sampled_from([-1, "3", 1.5, 2**64, None]),
    "pattern": st.sampled_from(["(", "[a-", "a{2,1}", "(?<=a)b", "\\"]),
    "$ref": st.sampled_from(["#/nope", "http://example.com/s.json", "#/$defs/x", ""]),
    "anyOf": JSON,
}
BAD_SCHEMA_VALUES = st.fixed_dictionaries({}, optional=KEYWORDS) | JSON
RESPONSE_FORMATS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["json_schema", "json_object", "text", "xml", 1, None])},
        optional={
            "json_schema": JSON
            | st.fixed_dictionaries(
                {"name": st.sampled_from(["s", "", "x" * 80, 3]), "schema": BAD_SCHEMA_VALUES},
                optional={"strict": JSON, "description": JSON},
            ),
        },
    ),
)


def test_random_bad_response_formats_get_a_400_never_a_5xx(mixed_cluster: Cluster) -> None:
    statuses: list[int] = []
    with httpx.Client(base_url=mixed_cluster.url, timeout=60) as http:

        @settings(
            max_examples=60, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(fmt=RESPONSE_FORMATS)
        def run(fmt: Any) -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2, "response_format": fmt}  # fmt: skip
            resp = http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})  # fmt: skip
            statuses.append(resp.status_code)
            assert resp.status_code in (200, 400), (fmt, resp.text[:500])
            if resp.status_code == 400:
                error = resp.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        run()
    assert statuses.count(400) >= 40, statuses
    assert in_flight(mixed_cluster) == 0
