"""`/generate` with `return_hidden_states` and prompt logprobs (`logprob_start_len`) through the
real process trees, mixed and prefill + decode over tcp, against transformers (fp32, CPU): the
prompt part comes from the prefill worker with the first token, the generated part from decode.
Chat and completions carry SGLang's `hidden_states` per choice (the last fed token's row), checked
against `/generate`'s through the openai client."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from pdserve.entrypoints.launch import Cluster

pytestmark = pytest.mark.slow

PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12, 13]
TOL = 1e-4
SAME_REQUEST_TOL = 1e-5  # one greedy request served by two routes
MODEL = "llama"  # the tiny model's directory name is its served name
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def hf_model(tiny_llama: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def generate(cluster: Cluster, **body: object) -> dict:
    sampling = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    payload = {"input_ids": PROMPT_IDS, "sampling_params": sampling, **body}
    r = httpx.post(f"{cluster.url}/generate", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("topology", ["mixed", "pd"])
def test_hidden_states_equal_transformers_final_layer(
    topology: str, request: pytest.FixtureRequest, hf_model: torch.nn.Module
) -> None:
    cluster = request.getfixturevalue(f"{topology}_cluster")
    out = generate(cluster, return_hidden_states=True)
    hidden = out["meta_info"]["hidden_states"]
    fed = PROMPT_IDS + out["output_ids"][:-1]
    assert len(hidden[0]) == len(PROMPT_IDS) and len(hidden) == 1 + len(out["output_ids"]) - 1
    rows = torch.tensor(hidden[0] + hidden[1:])
    with torch.no_grad():
        want = hf_model(torch.tensor([fed]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(rows, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("topology", ["mixed", "pd"])
def test_prompt_logprobs_equal_transformers_log_softmax(
    topology: str, request: pytest.FixtureRequest, hf_model: torch.nn.Module
) -> None:
    cluster = request.getfixturevalue(f"{topology}_cluster")
    out = generate(cluster, return_logprob=True, logprob_start_len=2, top_logprobs_num=2)
    meta = out["meta_info"]
    entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert [e[1] for e in entries] == PROMPT_IDS[2:]
    assert all(isinstance(e[2], str) for e in entries)  # return_text_in_logprobs defaults on
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([PROMPT_IDS])).logits[0], dim=-1)
    for j, (entry, top) in enumerate(zip(entries, tops)):
        i = 2 + j
        assert entry[0] == pytest.approx(logprobs[i - 1, PROMPT_IDS[i]].item(), abs=TOL)
        assert [t[1] for t in top] == logprobs[i - 1].topk(2).indices.tolist()
    first = generate(cluster, return_logprob=True, logprob_start_len=0)["meta_info"]
    assert first["input_token_logprobs"][0][:2] == [None, PROMPT_IDS[0]]
    assert len(first["input_token_logprobs"]) == len(PROMPT_IDS)


def openai_hidden_states(cluster: Cluster, route: str, stream: bool, **kw: object) -> list[float]:
    """One choice's `hidden_states` from chat or completions, whole or from the streamed chunk
    that carries it (after the choice's finish, as in SGLang)."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    create = client.chat.completions.create if route == "chat" else client.completions.create
    extra_body = {"return_hidden_states": True, "ignore_eos": True}
    res = create(model=MODEL, temperature=0, stream=stream, extra_body=extra_body, **kw)
    if not stream:
        return res.choices[0].hidden_states
    chunks = [c.choices[0] for c in res if c.choices]
    carriers = [c.delta if route == "chat" else c for c in chunks]
    found = [x.hidden_states for x in carriers if getattr(x, "hidden_states", None) is not None]
    assert len(found) == 1, found
    assert chunks[-1].finish_reason is None and chunks[-2].finish_reason == "length"
    return found[0]


def chat_prompt_ids(cluster: Cluster) -> list[int]:
    body = {"messages": MESSAGES, "add_generation_prompt": True}
    r = httpx.post(f"{cluster.url}/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("topology", ["mixed", "pd"])
def test_openai_routes_return_the_last_hidden_state_of_generate(
    topology: str, stream: bool, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue(f"{topology}_cluster")
    want = generate(cluster, return_hidden_states=True)["meta_info"]["hidden_states"][-1]
    got = openai_hidden_states(cluster, "completions", stream, prompt=PROMPT_IDS, max_tokens=4)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=SAME_REQUEST_TOL, rtol=0)
    chat_ids = chat_prompt_ids(cluster)
    meta = generate(cluster, input_ids=chat_ids, return_hidden_states=True)["meta_info"]
    assert len(meta["hidden_states"][0]) == len(chat_ids)
    got = openai_hidden_states(cluster, "chat", stream, messages=MESSAGES, max_tokens=4)
    want = meta["hidden_states"][-1]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=SAME_REQUEST_TOL, rtol=0)


def test_one_token_completion_has_no_hidden_state_row(mixed_cluster: Cluster) -> None:
    """Only the prompt ran, so SGLang's choice shape is an empty list (its first entry, the
    prompt's rows, is not the last token's)."""
    assert openai_hidden_states(mixed_cluster, "completions", False, prompt=PROMPT_IDS,
                                max_tokens=1) == []  # fmt: skip


def echoed(cluster: Cluster, stream: bool, **kw: object) -> tuple[str, dict[str, list]]:
    """A completion with echo and logprobs through the openai client: its text and its legacy
    logprobs, joined over the streamed chunks when streamed."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    res = client.completions.create(model=MODEL, echo=True, temperature=0, stream=stream, **kw)
    choices = [res.choices[0]] if not stream else [c.choices[0] for c in res if c.choices]
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}  # fmt: skip
    for choice in choices:
        if choice.logprobs is not None:
            for key in joined:
                joined[key] += getattr(choice.logprobs, key)
    return "".join(c.text for c in choices), joined


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("topology", ["mixed", "pd"])
def test_echo_with_logprobs_gives_the_prompts_logprobs_as_transformers_does(
    topology: str, stream: bool, request: pytest.FixtureRequest, hf_model: torch.nn.Module
) -> None:
    """vLLM's shape (what lm-eval's loglikelihood reads): the prompt's tokens first, the first
    without a logprob, then the generated ones; offsets index the echoed text."""
    cluster = request.getfixturevalue(f"{topology}_cluster")
    text, lp = echoed(cluster, stream, prompt=PROMPT_IDS, max_tokens=2, logprobs=2,
                      extra_body={"ignore_eos": True})  # fmt: skip
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([PROMPT_IDS])).logits[0], dim=-1)
    n = len(PROMPT_IDS)
    assert len(lp["tokens"]) == n + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, n):
        assert lp["token_logprobs"][i] == pytest.approx(
            logprobs[i - 1, PROMPT_IDS[i]].item(), abs=TOL
        )
        want_top = logprobs[i - 1].topk(2).values.tolist()
        assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(
            want_top, abs=TOL
        )
    first_generated = logprobs[n - 1].max().item()  # greedy: the likeliest token's logprob
    assert lp["token_logprobs"][n] == pytest.approx(first_generated, abs=TOL)
    assert len(lp["top_logprobs"][n]) <= 2
    # The text echoes the prompt, and each token starts where its text does.
    prompt_text = httpx.post(f"{cluster.url}/detokenize", json={"tokens": PROMPT_IDS}).json()[
        "text"
    ]
    assert text.startswith(prompt_text)
    for offset, token in zip(lp["text_offset"], lp["tokens"]):
        assert text[offset : offset + len(token)] == token, (offset, token, text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("topology", ["mixed", "pd"])
def test_zero_max_tokens_scores_the_prompt_and_generates_nothing(
    topology: str, stream: bool, request: pytest.FixtureRequest, hf_model: torch.nn.Module
) -> None:
    """max_tokens 0 with echo and logprobs (prompt scoring, as vLLM serves it): the prompt's
    text and logprobs, no generated token, in the text, the logprobs or the usage."""
    cluster = request.getfixturevalue(f"{topology}_cluster")
    text, lp = echoed(cluster, stream, prompt=PROMPT_IDS, max_tokens=0, logprobs=1)
    prompt_text = httpx.post(f"{cluster.url}/detokenize", json={"tokens": PROMPT_IDS}).json()[
        "text"
    ]
    assert text == prompt_text and len(lp["tokens"]) == len(PROMPT_IDS)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([PROMPT_IDS])).logits[0], dim=-1)
    want = [logprobs[i - 1, PROMPT_IDS[i]].item() for i in range(1, len(PROMPT_IDS))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=TOL)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    res = client.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=0)
    assert res.choices[0].text == "" and res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 0
    out = generate(cluster, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                   logprob_start_len=0)  # fmt: skip
    assert out["text"] == "" and out["output_ids"] == []
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 0 and meta["finish_reason"]["type"] == "length"
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT_IDS
