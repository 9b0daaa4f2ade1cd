"""Fields pdserve does not implement are refused with a 400 naming them, on chat, completions and
`/generate`; fields OpenAI clients send routinely are accepted and ignored; any other unknown
top-level field is a 400 naming it; `/generate` carries `priority` to the tokenizer, and the
OpenAI routes carry `response_format` and SGLang's grammar fields as sampling parameters."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from router_fakes import API_KEY, MODEL, Cluster

from pdserve.config.sampling_params import SamplingParams
from pdserve.router.request_fields import REFUSED

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"
RESPONSES = "/v1/responses"
ROUTES = {"chat": CHAT, "completions": COMPLETIONS, "generate": GENERATE, "responses": RESPONSES}
BASE_BODY = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 3},
    GENERATE: {"text": "hi", "sampling_params": {"max_new_tokens": 3}},
    RESPONSES: {"model": MODEL, "input": "hi", "max_output_tokens": 3},
}
# A value that asks for the feature (an accepted, harmless value is tested apart).
ASKING = {
    "regex": "[ab]+",
    "json_schema": '{"type": "object"}',
    "ebnf": 'root ::= "a"',
    "structural_tag": {"type": "structural_tag"},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "image_data": "https://example.com/cat.png",
    "video_data": "https://example.com/cat.mp4",
    "audio_data": "https://example.com/cat.wav",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "web_search_options": {},
    "suffix": " the end",
    "previous_response_id": "resp_1",
    "reasoning": {"effort": "high"},
    "background": True,
    "conversation": "conv_1",
    "include": ["reasoning.encrypted_content"],
    "prompt": {"id": "pmpt_1"},
    "max_tool_calls": 2,
    "top_logprobs": 2,
    "prompt_cache_key": "k",
    "truncation": "auto",
}
REFUSED_CASES = [
    pytest.param(ROUTES[route], name, id=f"{route}-{name}")
    for name, refusal in REFUSED.items()
    for route in sorted(refusal.routes)
]
# A structural tag in SGLang's shape and in xgrammar's.
STRUCTURES = {
    "type": "structural_tag",
    "structures": [{"begin": "<f=a>", "schema": {"type": "object"}, "end": "</f>"}],
    "triggers": ["<f="],
}
TAG_FORMAT = {
    "type": "structural_tag",
    "format": {"type": "tag", "begin": "<a>", "content": {"type": "any_text"}, "end": "</a>"},
}
HARMLESS = [
    pytest.param(CHAT, {"tools": []}, id="chat-empty-tools"),
    pytest.param(CHAT, {"tool_choice": "none"}, id="chat-tool_choice-none"),
    pytest.param(CHAT, {"response_format": {"type": "text"}}, id="chat-text-format"),
    pytest.param(COMPLETIONS, {"response_format": {"type": "text"}}, id="cmpl-text-format"),
    pytest.param(CHAT, {"response_format": {"type": "json_object"}}, id="chat-json-object"),
    pytest.param(COMPLETIONS, {"regex": "[ab]+"}, id="cmpl-sglang-regex"),
    pytest.param(GENERATE, {"sampling_params": {"ebnf": 'root ::= "a"'}}, id="generate-ebnf"),
    pytest.param(CHAT, {"modalities": ["text"]}, id="chat-text-modality"),
    pytest.param(CHAT, {"return_hidden_states": False}, id="chat-no-hidden-states"),
    pytest.param(CHAT, {"return_hidden_states": True}, id="chat-hidden-states"),
    pytest.param(COMPLETIONS, {"return_hidden_states": True}, id="cmpl-hidden-states"),
    pytest.param(COMPLETIONS, {"suffix": ""}, id="cmpl-empty-suffix"),
    pytest.param(GENERATE, {"lora_path": [None]}, id="generate-no-adapter"),
    pytest.param(GENERATE, {"return_logprob": True, "logprob_start_len": -1}, id="generate-lp-1"),
    pytest.param(GENERATE, {"logprob_start_len": 0}, id="generate-start-without-logprob"),
    pytest.param(GENERATE, {"return_logprob": True, "logprob_start_len": 0}, id="generate-lp0"),
    pytest.param(GENERATE, {"return_hidden_states": True}, id="generate-hidden-states"),
    pytest.param(CHAT, {"response_format": STRUCTURES}, id="chat-structural-tag"),
    pytest.param(COMPLETIONS, {"response_format": TAG_FORMAT}, id="cmpl-structural-tag-format"),
    pytest.param(
        GENERATE,
        {"sampling_params": {"structural_tag": json.dumps(STRUCTURES)}},
        id="generate-structural-tag",
    ),  # fmt: skip
    pytest.param(
        CHAT,
        {"stream": True, "stream_options": {"include_obfuscation": False}},
        id="chat-include-obfuscation",
    ),  # fmt: skip
]
IGNORED = {
    "user": "u-1",
    "metadata": {"team": "a"},
    "store": False,
    "service_tier": "auto",
    "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "hi"},
    "safety_identifier": "s-1",
    "prompt_cache_key": "k",
}
OTHER_REFUSALS = [
    pytest.param(CHAT, {"best_of": 2}, "best_of", id="chat-unknown-best_of"),
    pytest.param(COMPLETIONS, {"n": 1, "best_of": 3}, "best_of", id="cmpl-best_of>n"),
    pytest.param(CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top_lp>20"),
    pytest.param(COMPLETIONS, {"logprobs": 6}, "logprobs", id="cmpl-logprobs>5"),
    pytest.param(GENERATE, {"top_logprobs_num": 21}, "top_logprobs_num", id="gen-top_lp>20"),
    pytest.param(
        CHAT,
        {"stream": True, "stream_options": {"continuous_usage_stats": "often"}},
        "stream_options",
        id="chat-continuous-usage-not-bool",
    ),  # fmt: skip
    pytest.param(
        COMPLETIONS,
        {"stream": True, "stream_options": {"colour": 1}},
        "stream_options",
        id="cmpl-unknown-stream-option",
    ),  # fmt: skip
    pytest.param(
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages",
        id="chat-audio-part",
    ),  # fmt: skip
    pytest.param(
        CHAT,
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function"}],
                },
            ]
        },
        "messages",
        id="chat-message-tool_calls",
    ),  # fmt: skip
    pytest.param(COMPLETIONS, {"priority": 1}, "priority", id="cmpl-priority-unknown"),
    pytest.param(
        CHAT,
        {"chat_template_kwargs": {"tokenize": True}},
        "chat_template_kwargs",
        id="chat-kw-call",
    ),
    pytest.param(CHAT, {"chat_template_kwargs": [1]}, "chat_template_kwargs", id="chat-kw-list"),
    pytest.param(
        COMPLETIONS, {"chat_template_kwargs": {"a": 1}}, "chat_template_kwargs", id="cmpl-kw"
    ),
    pytest.param(
        CHAT, {"return_hidden_states": "yes"}, "return_hidden_states", id="chat-hidden-not-bool"
    ),
    pytest.param(
        COMPLETIONS, {"return_hidden_states": 1}, "return_hidden_states", id="cmpl-hidden-not-bool"
    ),
]
OTHER_REFUSALS += [
    pytest.param(GENERATE, {"sampling_params": {key: value}}, key, id=f"gen-sampling-{key}")
    for key, value in (("structural_tag", 5), ("regex", ""), ("json_schema", 5))
]
OTHER_REFUSALS += [
    pytest.param(path, {"response_format": fmt}, "response_format", id=f"{route}-format-{name}")
    for route, path in (("chat", CHAT), ("cmpl", COMPLETIONS))
    for name, fmt in (
        ("no-schema-object", {"type": "json_schema"}),
        ("no-schema", {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("no-name", {"type": "json_schema", "json_schema": {"schema": {}}}),
        ("schema-not-object", {"type": "json_schema", "json_schema": {"name": "x", "schema": 1}}),
        ("unknown-type", {"type": "xml"}),
        ("structural-tag-empty", {"type": "structural_tag"}),
        ("structural-tag-both", {**STRUCTURES, "format": TAG_FORMAT["format"]}),
        ("structural-tag-no-begin", {**STRUCTURES, "structures": [{"schema": {}, "end": "x"}]}),
        ("not-an-object", "json"),
        ("unknown-key", {"type": "json_object", "colour": 1}),
    )
]
OTHER_REFUSALS += [
    pytest.param(
        CHAT, {"response_format": {"type": "json_object"}, "regex": "a"}, "regex", id="chat-two"
    ),
    pytest.param(COMPLETIONS, {"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf", id="cmpl-two"),
    pytest.param(CHAT, {"regex": "a", "guided_json": {}}, "guided_json", id="chat-sglang-vllm"),
    pytest.param(
        COMPLETIONS,
        {"guided_choice": ["a"], "structured_outputs": {"regex": "b"}},
        "structured_outputs",
        id="cmpl-two-vllm",
    ),
    pytest.param(
        CHAT,
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        "structured_outputs",
        id="chat-structured-outputs-two",
    ),
    pytest.param(CHAT, {"structured_outputs": {}}, "structured_outputs", id="chat-so-empty"),
    pytest.param(
        CHAT,
        {"structured_outputs": {"whitespace_pattern": " "}},
        "structured_outputs",
        id="chat-so-unknown",
    ),
    pytest.param(CHAT, {"guided_choice": []}, "guided_choice", id="chat-choice-empty"),
    pytest.param(CHAT, {"guided_choice": "a"}, "guided_choice", id="chat-choice-not-list"),
    pytest.param(CHAT, {"guided_regex": 5}, "guided_regex", id="chat-guided-regex-int"),
    pytest.param(
        COMPLETIONS,
        {"include_stop_str_in_output": True, "no_stop_trim": False},
        "include_stop_str_in_output",
        id="cmpl-stop-str-disagree",
    ),  # fmt: skip
]
OTHER_REFUSALS += [
    pytest.param(path, {"frobnicate": 1}, "frobnicate", id=f"{route}-unknown")
    for route, path in ROUTES.items()
]
OTHER_REFUSALS += [
    pytest.param(GENERATE, {name: value}, name, id=f"generate-openai-{name}")
    for name, value in IGNORED.items()
    if name != "user"  # native /generate is not an OpenAI route: only its own fields
]


def post(cluster: Cluster, path: str, extra: dict[str, Any]) -> httpx.Response:
    body = {**BASE_BODY[path], **extra}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(cluster.url + path, json=body, headers=headers, timeout=30)


def assert_refused(resp: httpx.Response, param: str) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert param in err["message"], err
    return err


def test_every_refused_field_has_a_value_that_asks_for_it() -> None:
    assert set(ASKING) == set(REFUSED)


@pytest.mark.parametrize(("path", "name"), REFUSED_CASES)
def test_unimplemented_field_is_refused_naming_it(cluster: Cluster, path: str, name: str) -> None:
    assert_refused(post(cluster, path, {name: ASKING[name]}), name)


@pytest.mark.parametrize(("path", "extra", "param"), OTHER_REFUSALS)
def test_unsupported_values_and_unknown_fields_are_refused_naming_the_field(
    cluster: Cluster, path: str, extra: dict[str, Any], param: str
) -> None:
    assert_refused(post(cluster, path, extra), param)


@pytest.mark.parametrize(("path", "extra"), HARMLESS)
def test_values_that_ask_for_nothing_unsupported_are_accepted(
    cluster: Cluster, path: str, extra: dict[str, Any]
) -> None:
    resp = post(cluster, path, extra)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_fields_openai_clients_send_routinely_are_accepted_and_ignored(
    cluster: Cluster, path: str
) -> None:
    resp = post(cluster, path, IGNORED)
    assert resp.status_code == 200, resp.text
    sent = cluster.requests()[-1]
    assert sent.priority == 0


def test_openai_client_extra_body_structural_tag_is_refused(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"structural_tag": {"type": "structural_tag"}},
        )
    assert info.value.status_code == 400
    assert info.value.param == "structural_tag"  # type: ignore[attr-defined]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("path", "extra", "expected"),
    [
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": SCHEMA, "strict": True}}}, {"json_schema": json.dumps(SCHEMA)}),
        (COMPLETIONS, {"response_format": {"type": "json_object"}}, {"json_object": True}),
        (CHAT, {"json_schema": json.dumps(SCHEMA)}, {"json_schema": json.dumps(SCHEMA)}),
        (CHAT, {"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
        (COMPLETIONS, {"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ],
    ids=["chat-json-schema", "cmpl-json-object", "chat-sglang-schema", "chat-ebnf", "cmpl-regex"],
)  # fmt: skip
def test_openai_routes_carry_the_constraint_to_every_choice(
    cluster: Cluster, path: str, extra: dict[str, Any], expected: dict[str, Any]
) -> None:
    resp = post(cluster, path, {**extra, "n": 2})
    assert resp.status_code == 200, resp.text
    group_id = resp.json()["id"].split("-", 1)[1]
    sent = [cluster.find_req(lambda r, i=i: r.rid == f"{group_id}-{i}") for i in range(2)]
    for req in sent:
        assert {k: req.sampling[k] for k in expected} == expected


def test_generate_carries_priority_to_the_tokenizer(cluster: Cluster) -> None:
    resp = post(cluster, GENERATE, {"priority": -3, "rid": "prio-low"})
    assert resp.status_code == 200, resp.text
    assert cluster.find_req(lambda r: r.rid == "prio-low").priority == -3
    resp = post(cluster, GENERATE, {"rid": "prio-default"})
    assert cluster.find_req(lambda r: r.rid == "prio-default").priority == 0
    assert_refused(post(cluster, GENERATE, {"priority": 2**31}), "priority")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_openai_routes_carry_return_hidden_states_to_the_tokenizer(
    cluster: Cluster, path: str
) -> None:
    resp = post(cluster, path, {"return_hidden_states": True, "n": 2})
    assert resp.status_code == 200, resp.text
    group_id = resp.json()["id"].split("-", 1)[1]
    rids = {f"{group_id}-0", f"{group_id}-1"}
    sent = [r for r in cluster.requests() if r.rid in rids]
    assert len(sent) == 2 and all(r.return_hidden_states for r in sent)
    assert all("hidden_states" in choice for choice in resp.json()["choices"])
    resp = post(cluster, path, {})
    group_id = resp.json()["id"].split("-", 1)[1]
    assert not cluster.find_req(lambda r: r.rid == group_id).return_hidden_states
    assert all("hidden_states" not in choice for choice in resp.json()["choices"])


def test_chat_carries_chat_template_kwargs_to_the_tokenizer(cluster: Cluster) -> None:
    kwargs = {"enable_thinking": False, "names": ["a", "é"], "depth": {"n": 2}}
    resp = post(cluster, CHAT, {"chat_template_kwargs": kwargs, "n": 2})
    assert resp.status_code == 200, resp.text
    group_id = resp.json()["id"].split("-", 1)[1]
    sent = [r for r in cluster.requests() if r.rid.startswith(group_id)]
    assert len(sent) == 2 and all(r.chat_template_kwargs == kwargs for r in sent)
    resp = post(cluster, CHAT, {"chat_template_kwargs": {}})
    group_id = resp.json()["id"].split("-", 1)[1]
    assert cluster.find_req(lambda r: r.rid == group_id).chat_template_kwargs is None


TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_chat_carries_tools_to_the_template_and_required_calls_as_a_schema(
    cluster: Cluster,
) -> None:
    resp = post(cluster, CHAT, {"tools": [TOOL], "tool_choice": "required"})
    assert resp.status_code == 200, resp.text
    req = cluster.find_req(lambda r: r.rid == resp.json()["id"].removeprefix("chatcmpl-"))
    assert req.tools == [TOOL]
    schema = json.loads(req.sampling["json_schema"])
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_time"}
    # The fake's answer is not a call: it stays the content.
    message = resp.json()["choices"][0]["message"]
    assert message["content"] and "tool_calls" not in message
    one = post(cluster, CHAT, {"tools": [TOOL], "tool_choice": "required",
                               "parallel_tool_calls": False})  # fmt: skip
    req = cluster.find_req(lambda r: r.rid == one.json()["id"].removeprefix("chatcmpl-"))
    assert json.loads(req.sampling["json_schema"])["maxItems"] == 1
    none = post(cluster, CHAT, {"tools": [TOOL], "tool_choice": "none"})
    req = cluster.find_req(lambda r: r.rid == none.json()["id"].removeprefix("chatcmpl-"))
    assert req.tools is None and req.sampling.get("json_schema") is None


def test_tool_choices_the_model_cannot_serve_are_refused(cluster: Cluster) -> None:
    # The fakes' model has no chat template: no tool-call format for `auto` to read.
    assert_refused(post(cluster, CHAT, {"tools": [TOOL]}), "tool_choice")
    named = {"type": "function", "function": {"name": "get_time"}}
    both = {"tools": [TOOL], "tool_choice": named, "response_format": {"type": "json_object"}}
    assert_refused(post(cluster, CHAT, both), "tool_choice")
    assert_refused(post(cluster, CHAT, {"tools": [{"type": "function"}]}), "tools")


@pytest.mark.parametrize(
    ("path", "extra", "expected"),
    [
        (CHAT, {"response_format": STRUCTURES}, STRUCTURES),
        (COMPLETIONS, {"response_format": TAG_FORMAT}, TAG_FORMAT),
        (GENERATE, {"sampling_params": {"structural_tag": STRUCTURES}}, STRUCTURES),
    ],
)
def test_a_structural_tag_reaches_the_tokenizer_as_its_json_text(
    cluster: Cluster, path: str, extra: dict[str, Any], expected: dict[str, Any]
) -> None:
    marker = f"tag {len(cluster.requests())}"  # names this request among those recorded
    prompt = {CHAT: {"messages": [{"role": "user", "content": marker}]},
              COMPLETIONS: {"prompt": marker}, GENERATE: {"text": marker}}[path]  # fmt: skip
    assert post(cluster, path, {**extra, **prompt}).status_code == 200
    found = cluster.find_req(lambda r: marker in (r.text or str(r.messages)))
    sent = SamplingParams.from_dict(found.sampling)
    assert sent.grammar is not None and sent.grammar.kind == "structural_tag"
    assert json.loads(sent.grammar.text) == expected


@pytest.mark.parametrize(
    ("path", "extra", "key", "value"),
    [
        (CHAT, {"guided_json": {"type": "object"}}, "json_schema", '{"type": "object"}'),
        (COMPLETIONS, {"guided_json": '{"type": "array"}'}, "json_schema", '{"type": "array"}'),
        (CHAT, {"guided_regex": "[ab]+"}, "regex", "[ab]+"),
        (COMPLETIONS, {"guided_choice": ["yes", "no"]}, "regex", "(yes|no)"),
        (CHAT, {"guided_grammar": 'root ::= "a"'}, "ebnf", 'root ::= "a"'),
        (CHAT, {"structured_outputs": {"json": {"type": "object"}}}, "json_schema",
         '{"type": "object"}'),
        (COMPLETIONS, {"structured_outputs": {"choice": ["a.b", "c"]}}, "regex", "(a\\.b|c)"),
        (CHAT, {"structured_outputs": {"json_object": True}}, "json_object", True),
        (CHAT, {"structured_outputs": {"grammar": 'root ::= "a"'}}, "ebnf", 'root ::= "a"'),
        (COMPLETIONS, {"include_stop_str_in_output": True}, "no_stop_trim", True),
        (CHAT, {"include_stop_str_in_output": False, "no_stop_trim": False}, "no_stop_trim",
         False),
    ],
)  # fmt: skip
def test_vllms_fields_become_the_same_sampling_params(
    cluster: Cluster, path: str, extra: dict[str, Any], key: str, value: Any
) -> None:
    marker = f"vllm {len(cluster.requests())}"
    prompt = {CHAT: {"messages": [{"role": "user", "content": marker}]},
              COMPLETIONS: {"prompt": marker}}[path]  # fmt: skip
    resp = post(cluster, path, {**extra, **prompt})
    assert resp.status_code == 200, resp.text
    found = cluster.find_req(lambda r: marker in (r.text or str(r.messages)))
    assert SamplingParams.from_dict(found.sampling).to_dict()[key] == value


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_truncate_prompt_tokens_reaches_the_tokenizer(cluster: Cluster, path: str) -> None:
    marker = f"truncate {len(cluster.requests())}"
    prompt = {CHAT: {"messages": [{"role": "user", "content": marker}]},
              COMPLETIONS: {"prompt": marker}}[path]  # fmt: skip
    assert post(cluster, path, {**prompt, "truncate_prompt_tokens": 7}).status_code == 200
    found = cluster.find_req(lambda r: marker in (r.text or str(r.messages)))
    assert found.truncate_prompt_tokens == 7
    for bad in (0, -2, 1.5):
        resp = post(cluster, path, {**prompt, "truncate_prompt_tokens": bad})
        assert_refused(resp, "truncate_prompt_tokens")
