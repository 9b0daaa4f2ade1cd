"""Property-based fuzzing of the three generation routes over the real FastAPI app (fake peers):
whatever the body, never a 5xx, every error is OpenAI's error body, and nothing stays in flight.

Bodies mix plausible values with hostile ones (lone surrogates, ints past int64, NaN, wrong types,
oversized lists); the fake tokenizer answers whatever passes the router.
The example count is modest so `make test` stays fast; `benchmarks/fuzz_soak.py` runs thousands.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_fakes import API_KEY, MODEL, Cluster, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HOSTILE = st.sampled_from(
    [None, True, False, 0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, 1e308,
     float("nan"), float("inf"), "", "ok \ud800", "\udfff", "\x00", "x" * 300, [], {}, [[]],
     {"a": "\ud800"}]
)  # fmt: skip


def _words(text: str) -> str:
    # The fakes stall on HANG and SLOW (see router_fakes): keep them out of fuzzed text.
    return text.replace("HANG", "hang").replace("SLOW", "slow")


TEXT = st.text(max_size=40).map(_words) | st.sampled_from(["hi", "ok \ud800", "a\x00b", "é東"])
WORDS = st.text(min_size=1, max_size=12).map(_words) | st.sampled_from(["hi", "é東", " the"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=10,
)
BIG_INTS = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1])
INTS = st.integers(-3, 300) | BIG_INTS
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5)
TOKEN_IDS = st.lists(st.integers(0, 600), max_size=5)
WILD_IDS = st.lists(st.integers(-2, 600) | BIG_INTS, max_size=5)
BIAS_KEYS = st.sampled_from(["0", "5", "511", "512", "100000", "-1", "x", "1e3", "\ud800", "٣"])
LOGIT_BIAS = st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=4)
WILD_BIAS = st.dictionaries(BIAS_KEYS | st.integers(0, 10**6).map(str), FLOATS, max_size=4)


def field(plausible: st.SearchStrategy, wild: st.SearchStrategy = HOSTILE) -> st.SearchStrategy:
    """A field's value: mostly plausible (8 in 10), else hostile or wild (wrong range, type)."""
    return st.sampled_from([plausible] * 8 + [HOSTILE, wild]).flatmap(lambda choice: choice)


def number(low: float, high: float) -> st.SearchStrategy:
    return field(st.floats(low, high), FLOATS)


POSITIVE = field(st.integers(0, 64), INTS)
SAMPLING = {
    "temperature": number(0, 2),
    "top_p": number(0.01, 1),
    "top_k": field(st.integers(-1, 50), INTS),
    "min_p": number(0, 1),
    "seed": field(st.integers(0, 2**63 - 1), INTS),
    "presence_penalty": number(-2, 2),
    "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0.01, 2),
    "stop": field(WORDS | st.lists(WORDS, max_size=4), TEXT | st.lists(TEXT, max_size=40)),
    "stop_token_ids": field(TOKEN_IDS, WILD_IDS),
    "logit_bias": field(LOGIT_BIAS, WILD_BIAS),
    "ignore_eos": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "model": field(st.just(MODEL), st.sampled_from(["gpt-17", "ok \ud800"]) | TEXT),
    "n": field(st.integers(1, 4), INTS),
    "stream": st.booleans(),
    "user": field(TEXT),
}
# vLLM's fields on the OpenAI routes (the constraints: at most one counts, two are a 400)
VLLM_FIELDS = {
    "guided_regex": field(st.sampled_from(["[ab]+", "(yes|no)"]), TEXT | JSON),
    "guided_choice": field(st.lists(WORDS, min_size=1, max_size=3), JSON),
    "guided_json": field(st.just({"type": "object"}), JSON),
    "structured_outputs": field(st.just({"regex": "[0-9]+"}), JSON),
    "truncate_prompt_tokens": field(st.integers(-1, 64), INTS),
    "include_stop_str_in_output": field(st.booleans()),
    "return_tokens_as_token_ids": field(st.booleans()),
}
TAG = {"type": "tag", "begin": "<a>", "content": {"type": "any_text"}, "end": "</a>"}
RESPONSE_FORMATS = st.sampled_from(
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        {"type": "structural_tag", "format": TAG},
        {"type": "structural_tag", "triggers": ["<f="],
         "structures": [{"begin": "<f=a>", "schema": {"type": "object"}, "end": "</f>"}]},
    ]
)  # fmt: skip
PART = st.fixed_dictionaries(
    {"type": field(st.just("text"), st.sampled_from(["image_url", "audio"])), "text": TEXT}
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["user", "system"]), st.sampled_from(["tool", "wizard"])),
        "content": field(TEXT | st.lists(PART, max_size=2), st.none()),
    }
)
CHAT_BODY = st.fixed_dictionaries(
    {"messages": field(st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={
        **SAMPLING,
        "max_tokens": POSITIVE,
        "max_completion_tokens": POSITIVE,
        "min_tokens": field(st.integers(0, 4), INTS),
        "logprobs": field(st.booleans()),
        "top_logprobs": field(st.integers(0, 5), INTS),
        "continue_final_message": field(st.booleans()),
        "add_generation_prompt": field(st.booleans()),
        "stream_options": field(
            st.fixed_dictionaries(
                {"include_usage": st.booleans()}, optional={"continuous_usage_stats": st.booleans()}
            )
        ),
        "response_format": field(RESPONSE_FORMATS, st.fixed_dictionaries({"type": TEXT}) | JSON),
        "tools": field(st.just([]), st.lists(JSON, max_size=1)),
        "extra": JSON,
        **VLLM_FIELDS,
    },
)
PROMPT = TEXT | st.lists(TEXT, max_size=3) | WILD_IDS | st.lists(WILD_IDS, max_size=3)
COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": field(PROMPT), "max_tokens": POSITIVE},
    optional={
        **SAMPLING,
        "min_tokens": field(st.integers(0, 4), INTS),
        "logprobs": field(st.none() | st.integers(0, 5), INTS),
        "echo": field(st.booleans()),
        "suffix": field(st.just(""), TEXT),
        "best_of": field(st.none(), INTS),
        **VLLM_FIELDS,
    },
)
GENERATE_SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        **{k: v for k, v in SAMPLING.items() if k not in ("model", "stream", "user")},
        "max_new_tokens": POSITIVE,
        "min_new_tokens": field(st.integers(0, 4), INTS),
        "no_stop_trim": field(st.booleans()),
        "structural_tag": field(st.just({"type": "structural_tag", "format": TAG}), JSON),
        "grammar_after_reasoning": field(st.sampled_from(["qwen3", "deepseek_r1"]), TEXT),
        "colour": JSON,
    },
)
GENERATE_TEXT = field(TEXT | st.lists(TEXT, max_size=3))
GENERATE_IDS = field(TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3), WILD_IDS)
GENERATE_REST = st.fixed_dictionaries(
    {},
    optional={
        "sampling_params": field(GENERATE_SAMPLING | st.lists(GENERATE_SAMPLING, max_size=3)),
        "stream": st.booleans(),
        "rid": field(st.none() | st.uuids().map(str), TEXT | st.lists(TEXT, max_size=3)),
        "return_logprob": field(st.booleans()),
        "top_logprobs_num": field(st.integers(0, 5), INTS),
        "logprob_start_len": field(st.just(-1), INTS),
        "lora_path": field(st.none(), TEXT),
        "image_data": field(st.none(), JSON),
    },
)
GENERATE_BODY = st.builds(
    lambda prompt, rest: {**prompt, **rest},
    st.one_of(
        st.fixed_dictionaries({"text": GENERATE_TEXT}),
        st.fixed_dictionaries({"input_ids": GENERATE_IDS}),
        st.fixed_dictionaries({}, optional={"text": GENERATE_TEXT, "input_ids": GENERATE_IDS}),
    ),
    GENERATE_REST,
)


INPUT_PART = st.fixed_dictionaries(
    {"type": field(st.sampled_from(["input_text", "output_text"]), TEXT), "text": TEXT}
)
INPUT_MESSAGE = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["user", "developer", "assistant"]), TEXT),
        "content": field(TEXT | st.lists(INPUT_PART, max_size=2), JSON),
    }
)
FORMATS = st.sampled_from(
    [{"type": "text"}, {"type": "json_object"},
     {"type": "json_schema", "name": "s", "schema": {"type": "object"}}]
)  # fmt: skip
RESPONSES_BODY = st.fixed_dictionaries(
    {"input": field(TEXT | st.lists(INPUT_MESSAGE, min_size=1, max_size=3))},
    optional={
        "model": SAMPLING["model"],
        "instructions": field(TEXT),
        "max_output_tokens": POSITIVE,
        "temperature": SAMPLING["temperature"],
        "top_p": SAMPLING["top_p"],
        "stream": st.booleans(),
        "text": field(st.fixed_dictionaries({"format": FORMATS}), JSON),
        "store": field(st.booleans()),
        "previous_response_id": field(st.none(), TEXT),
        "extra": JSON,
    },
)


def check_one(
    cluster: Cluster, client: httpx.Client, path: str, body: dict[str, Any], counts: Counter[str]
) -> None:
    """POST the body; assert the answer's shape; wait for the in-flight count to be zero."""
    raw = json.dumps(body).encode()  # ASCII: a lone surrogate travels escaped, NaN as NaN
    resp = client.post(path, content=raw)
    counts[f"{resp.status_code // 100}xx"] += 1
    assert resp.status_code < 500, (path, body, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, resp.text[:500]
        assert isinstance(err["message"], str) and err["message"]
    elif resp.headers["content-type"].startswith("text/event-stream"):
        last = resp.text.rstrip().rsplit("\n\n", 1)[-1]
        if path == "/v1/responses":  # typed events: the last one ends the response, or an error
            ends = ('"type": "response.completed"', '"type": "response.incomplete"', '"error"')
            assert any(end in last for end in ends), resp.text[-300:]
        else:
            assert last == "data: [DONE]", resp.text[-300:]
    else:
        resp.json()
    wait_until(lambda: len(cluster.router.tracker) == 0, 5.0)


@pytest.mark.parametrize(
    ("path", "bodies"),
    [
        ("/v1/chat/completions", CHAT_BODY),
        ("/v1/completions", COMPLETION_BODY),
        ("/generate", GENERATE_BODY),
        ("/v1/responses", RESPONSES_BODY),
    ],  # fmt: skip
    ids=["chat", "completions", "generate", "responses"],
)
def test_fuzzed_bodies_never_get_a_5xx_or_leave_requests_in_flight(
    cluster: Cluster, path: str, bodies: st.SearchStrategy
) -> None:
    counts: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=cluster.url, headers=headers, timeout=30) as client:

        @FUZZ
        @given(body=bodies)
        def run(body: dict[str, Any]) -> None:
            check_one(cluster, client, path, body, counts)

        run()
        assert client.get("/server_info").json()["num_requests_in_flight"] == 0
    assert counts["5xx"] == 0
    # The bodies reach both ends: some are served, some refused.
    assert counts["2xx"] >= 10 and counts["4xx"] >= 10, counts
