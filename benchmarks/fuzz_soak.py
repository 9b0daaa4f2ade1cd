"""Fuzz soak: N hostile or odd requests against a pdserve server, counting what came back.

    python benchmarks/fuzz_soak.py --url http://127.0.0.1:8000 --api-key KEY -n 5000
    python benchmarks/fuzz_soak.py --tiny -n 5000        # starts a CPU prefill+decode cluster

Bodies for /v1/chat/completions, /v1/completions and /generate mix plausible values with hostile
ones (lone surrogates, ints past int64, NaN, wrong types, out-of-vocabulary ids, oversized lists),
and constraints (`response_format`, `json_schema`, `regex`, `ebnf`, `structural_tag`, some after a
reasoning model's thinking) mix small valid grammars with broken, too deep and too long ones; /tokenize, /detokenize, /v1/embeddings (a 400 on a generation
model) and /abort_request get fuzzed bodies too. A constrained answer that ended by its grammar
("stop") must parse: a JSON answer is parsed, a regex answer fully matched. Prints the counts of 2xx/4xx/5xx, hangs (no answer within --timeout-s), error bodies that are not
OpenAI's, and the requests still in flight afterwards; exits 1 if any 5xx, hang, malformed error
body or leftover request was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
OTHER_PATHS = ("/tokenize", "/detokenize", "/v1/embeddings", "/abort_request")
# Small grammars a random-weight model ends within a few tokens, and how to check an answer.
GOOD_SCHEMAS: list[dict[str, Any]] = [
    {"enum": ["red", "green"]},
    {"type": "boolean"},
    {"type": "integer", "minimum": 0, "maximum": 9},
    {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
    {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}},
]  # fmt: skip
GOOD_REGEXES = [r"(yes|no)", r"[0-9]{1,3}", r"[a-c]{2}"]
GOOD_EBNF = ['root ::= "yes" | "no"', "root ::= [0-9] [0-9]?"]
GOOD_STRUCTURAL_TAGS = [
    {"type": "structural_tag", "structures": [{"begin": "<f=a>", "schema": {"type": "object"},
     "end": "</f>"}], "triggers": ["<f="]},
    {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>",
     "content": {"type": "json_schema", "json_schema": {"type": "object"}}, "end": "</a>"}},
]  # fmt: skip
BAD_GRAMMARS = [
    "", "{", "[a-", "(ab", "a(?=b)", "root ::= ", '{"type": "strin"}', "[1, 2]",
    '{"type": "array", "items": ' * 200 + "{}" + "}" * 200,  # past the nesting limit
    "a" * 70_000,  # past router.limits.max_grammar_chars
]  # fmt: skip
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, 1e308,
    float("nan"), float("inf"), "", "ok \ud800", "\udfff", "\x00", "x" * 300, [], {}, [[]],
    {"a": "\ud800"},
]  # fmt: skip
WORDS = ["hi", "the keeper", "lighthouse", "é東", "stairs", "🙂", "a\x00b"]
ODD_WORDS = ["ok \ud800", "\udfff", "\x00", "\ufeff", "\u202e"]  # one word in 30
BIG_INTS = [2**31, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1]


class Fuzzer:
    """Random request bodies; each field is plausible most of the time, hostile otherwise."""

    def __init__(self, seed: int, model: str) -> None:
        self.rng = random.Random(seed)
        self.model = model

    def pick(self, plausible: Any, hostile_rate: float = 0.15) -> Any:
        if self.rng.random() < hostile_rate:
            return self.rng.choice(HOSTILE)
        return plausible() if callable(plausible) else plausible

    def text(self) -> str:
        words = (self.rng.choice(ODD_WORDS if self.rng.random() < 1 / 30 else WORDS)
                 for _ in range(self.rng.randint(0, 6)))  # fmt: skip
        return " ".join(words)

    def int_(self, low: int = -3, high: int = 300) -> int:
        if self.rng.random() < 0.1:
            return self.rng.choice(BIG_INTS)
        return self.rng.randint(low, high)

    def float_(self) -> float:
        return self.rng.choice([0.0, 0.5, 1.0, 1.5, -1.0, 3.0, 1e-9, float("nan")])

    def token_ids(self) -> list[int]:
        return [self.int_(-2, 600) for _ in range(self.rng.randint(0, 5))]

    def logit_bias(self) -> dict[str, Any]:
        keys = ["0", "5", "511", "512", "100000", "-1", "x", "1e3", "\ud800"]
        return {
            self.rng.choice(keys): self.rng.choice([1, -1, 100, 1e9, float("nan")])
            for _ in range(self.rng.randint(0, 3))
        }

    def sampling(self) -> dict[str, Any]:
        fields = {
            "temperature": self.float_, "top_p": self.float_, "top_k": self.int_,
            "min_p": self.float_, "seed": self.int_, "presence_penalty": self.float_,
            "frequency_penalty": self.float_, "repetition_penalty": self.float_,
            "stop": lambda: self.rng.choice([self.text(), [self.text(), self.text()]]),
            "stop_token_ids": self.token_ids, "logit_bias": self.logit_bias,
            "ignore_eos": lambda: self.rng.random() < 0.5,
        }  # fmt: skip
        chosen = self.rng.sample(sorted(fields), self.rng.randint(0, 4))
        return {key: self.pick(fields[key]) for key in chosen}

    def constraint(self) -> dict[str, Any]:
        """One of SGLang's constraint fields: a small valid grammar mostly, else a bad one."""
        key = self.rng.choice(["json_schema", "regex", "ebnf", "structural_tag", "json_object"])
        if key == "json_object":
            return {key: self.pick(True)}
        if self.rng.random() < 0.3:
            return {key: self.rng.choice([*BAD_GRAMMARS, *HOSTILE])}
        if key == "structural_tag":
            return {key: self.pick(lambda: json.dumps(self.rng.choice(GOOD_STRUCTURAL_TAGS)))}
        if key == "json_schema":
            return {key: json.dumps(self.rng.choice(GOOD_SCHEMAS))}
        return {key: self.rng.choice(GOOD_REGEXES if key == "regex" else GOOD_EBNF)}

    def response_format(self) -> Any:
        kind = self.rng.choice(["text", "json_object", "json_schema", "json_schema", "tag"])
        if kind == "tag":  # a good structural tag, or one with a part broken
            tag = dict(self.rng.choice(GOOD_STRUCTURAL_TAGS))
            if self.rng.random() < 0.3:
                tag[self.rng.choice(sorted(tag))] = self.rng.choice([*BAD_GRAMMARS[:8], *HOSTILE])
            return tag
        if kind != "json_schema":
            return self.pick({"type": kind})
        schema = self.pick(lambda: self.rng.choice(GOOD_SCHEMAS), 0.2)
        spec = {"name": self.pick("answer", 0.05), "schema": schema, "strict": self.pick(True)}
        return {"type": kind, "json_schema": self.pick(spec, 0.05)}

    def other_body(self, path: str) -> dict[str, Any]:
        if path == "/tokenize":
            body: dict[str, Any] = {"prompt": self.pick(self.text)}
            if self.rng.random() < 0.3:
                body["add_special_tokens"] = self.pick(True)
            return body
        if path == "/detokenize":
            return {"tokens": self.pick(self.token_ids)}
        if path == "/v1/embeddings":
            return {"model": self.pick(self.model, 0.05), "input": self.pick(self.text)}
        return self.rng.choice([{"rid": self.pick(self.text)}, {"abort_all": self.pick(False)}])

    def body(self, path: str) -> dict[str, Any]:
        """One body for `path` (max_tokens kept small: this is about the edge, not speed)."""
        if path in OTHER_PATHS:
            return self.other_body(path)
        constrained = self.rng.random() < 0.25
        # A grammar's answer is only checked when it ends by the grammar: give it room to.
        max_tokens = self.pick(lambda: self.rng.randint(1, 24 if constrained else 8), 0.05)
        if path == "/generate":
            sampling = {**self.sampling(), "max_new_tokens": max_tokens}
            if constrained:
                sampling.update(self.constraint())
                if self.rng.random() < 0.3:  # a reasoning model's: the grammar after thinking
                    parser = self.rng.choice(["qwen3", "deepseek_r1"])
                    sampling["grammar_after_reasoning"] = self.pick(parser, 0.1)
            if self.rng.random() < 0.1:
                sampling["skip_special_tokens"] = self.pick(False)
            if self.rng.random() < 0.1:
                sampling["min_new_tokens"] = self.int_(0, 10)
            body: dict[str, Any] = {"sampling_params": self.pick(sampling, 0.05)}
            if self.rng.random() < 0.5:
                body["text"] = self.pick(lambda: self.rng.choice([self.text(), [self.text()] * 2]))
            else:
                body["input_ids"] = self.pick(lambda: [5, *self.token_ids()])
            body["stream"] = self.rng.random() < 0.3
            if self.rng.random() < 0.15:
                body["return_logprob"] = self.pick(True)
                body["top_logprobs_num"] = self.pick(lambda: self.rng.randint(0, 3))
            return body
        body = {**self.sampling(), "max_tokens": max_tokens, "stream": self.rng.random() < 0.3}
        if constrained:
            if path == "/v1/chat/completions" and self.rng.random() < 0.6:
                body["response_format"] = self.response_format()
            else:
                body.update(self.constraint())
        body["model"] = self.pick(self.model, 0.05)
        body["n"] = self.pick(lambda: self.rng.randint(1, 3), 0.05)
        if self.rng.random() < 0.1:
            body["min_tokens"] = self.int_(0, 10)
        if path == "/v1/chat/completions":
            message = {"role": self.pick("user", 0.1), "content": self.pick(self.text, 0.1)}
            body["messages"] = self.pick([message], 0.1)
            if self.rng.random() < 0.15:
                body["tools"] = self.pick(TOOLS)
                named = {"type": "function", "function": {"name": self.pick("pick")}}
                body["tool_choice"] = self.pick(
                    lambda: self.rng.choice(["none", "auto", "required", named])
                )
                if self.rng.random() < 0.3:
                    body["parallel_tool_calls"] = self.pick(False)
            if self.rng.random() < 0.15:
                body["logprobs"] = self.pick(True)
                body["top_logprobs"] = self.pick(lambda: self.rng.randint(0, 3))
        else:
            if self.rng.random() < 0.15:
                body["logprobs"] = self.pick(lambda: self.rng.randint(0, 3))
                body["echo"] = self.pick(self.rng.random() < 0.5)
            prompt = self.rng.choice([self.text, lambda: [self.text(), self.text()],
                                      lambda: [5, *self.token_ids()]])  # fmt: skip
            body["prompt"] = self.pick(prompt, 0.1)
        return body


EBNF_AS_REGEX = {'root ::= "yes" | "no"': "(yes|no)", "root ::= [0-9] [0-9]?": "[0-9]{1,2}"}


def fields_of(path: str, body: dict[str, Any]) -> Any:
    """Where a body's sampling fields are (a dict for every plausible body)."""
    return body.get("sampling_params") if path == "/generate" else body


def _answer_part(text: str, after_reasoning: Any) -> str:
    """What a grammar that starts after the thinking holds: the text past the first </think>
    (qwen3: only when the text opened with <think>) and up to 8 blank characters."""
    thinks = after_reasoning == "deepseek_r1" or (
        after_reasoning == "qwen3" and text.startswith("<think>")
    )
    if thinks:
        text = text.partition("</think>")[2]
    return (
        re.sub(r"^[ \t\r\n]{0,8}", "", text)
        if after_reasoning in ("qwen3", "deepseek_r1")
        else text
    )


def grammar_of(path: str, body: dict[str, Any]) -> tuple[str, Any] | None:
    """The constraint a body asks for, when the answers it ends ("stop") can be checked: one
    of the valid grammars above and no stop strings or stop ids that could end it first."""
    fields = fields_of(path, body)
    if not isinstance(fields, dict) or fields.get("stop") or fields.get("stop_token_ids"):
        return None
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "structural_tag":
        return None  # free text around its tags: not checked here (tests/worker cover it)
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        return ("json", None)
    if fields.get("json_object") is True:
        return ("json", None)
    if isinstance(fields.get("json_schema"), str):
        return ("json", None)
    if fields.get("regex") in GOOD_REGEXES:
        return ("regex", fields["regex"])
    if fields.get("ebnf") in EBNF_AS_REGEX:
        return ("regex", EBNF_AS_REGEX[fields["ebnf"]])
    return None


def answers(path: str, data: Any) -> list[tuple[str, bool]]:
    """(text, ended by its grammar or EOS) for each answer of a non-streamed response."""
    if path == "/generate":
        items = data if isinstance(data, list) else [data]
        return [(it["text"], it["meta_info"]["finish_reason"]["type"] == "stop") for it in items]
    key = "message" if path == "/v1/chat/completions" else None
    out = []
    for choice in data["choices"]:
        text = choice[key]["content"] if key else choice["text"]
        out.append((text or "", choice["finish_reason"] == "stop"))
    return out


def check_answers(path: str, body: dict[str, Any], data: Any, counts: Counter) -> None:
    """Count answers a grammar ended that do not satisfy it (an echoed prompt is not checked)."""
    grammar = grammar_of(path, body)
    if grammar is None or body.get("echo"):
        return
    kind, regex = grammar
    for text, ended in answers(path, data):
        if not ended:
            continue
        counts["constrained answers checked"] += 1
        text = _answer_part(text, fields_of(path, body).get("grammar_after_reasoning"))
        try:
            ok = bool(re.fullmatch(regex, text)) if kind == "regex" else _parses(text)
        except re.error:
            ok = False
        if not ok:
            counts["constrained answer invalid"] += 1
            print(f"invalid constrained answer on {path}: {body!r:.300} -> {text!r:.200}",
                  file=sys.stderr)  # fmt: skip


ERROR_KINDS: Counter = Counter()  # (status, param, message shape) of each error answered


def _shape(message: str) -> str:
    """An error message with its quoted values and numbers elided, to group errors by kind."""
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message[:120])
    return re.sub(r"\d+", "N", message)


def _parses(text: str) -> bool:
    try:
        json.loads(text, strict=False)  # xgrammar may leave control characters in strings
    except ValueError:
        return False
    return True


async def one(client: httpx.AsyncClient, path: str, body: dict[str, Any], counts: Counter) -> None:
    raw = json.dumps(body).encode()  # ASCII: lone surrogates travel escaped
    try:
        resp = await client.post(path, content=raw)
    except httpx.TimeoutException:
        counts["hang"] += 1
        print(f"hang on {path}: {body!r:.300}", file=sys.stderr)
        return
    except httpx.HTTPError as e:
        counts[f"transport error {type(e).__name__}"] += 1
        return
    counts[f"{resp.status_code // 100}xx"] += 1
    if resp.status_code >= 500:
        print(f"5xx on {path}: {body!r:.300} -> {resp.text[:300]}", file=sys.stderr)
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            ok = set(err) == {"message", "type", "param", "code"} and err["message"]
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            ERROR_KINDS[(resp.status_code, err["param"], _shape(err["message"]))] += 1
        else:
            counts["malformed error body"] += 1
            print(f"malformed error on {path}: {body!r:.300} -> {resp.text[:300]}",
                  file=sys.stderr)  # fmt: skip
    elif path in PATHS and not resp.headers["content-type"].startswith("text/event-stream"):
        check_answers(path, body, resp.json(), counts)


async def soak(url: str, api_key: str | None, num: int, concurrency: int, args: Any) -> Counter:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout_s) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        fuzzer = Fuzzer(args.seed, model)
        paths = PATHS * 6 + OTHER_PATHS  # generation 18 times in 22
        bodies = [(p := fuzzer.rng.choice(paths), fuzzer.body(p)) for _ in range(num)]
        counts: Counter = Counter()
        gate = asyncio.Semaphore(concurrency)

        async def gated(path: str, body: dict[str, Any]) -> None:
            async with gate:
                await one(client, path, body, counts)

        start = time.perf_counter()
        await asyncio.gather(*(gated(p, b) for p, b in bodies))
        counts["seconds"] = round(time.perf_counter() - start, 1)
        counts["in_flight_after"] = await _in_flight_after(client, args.settle_s)
    return counts


async def _in_flight_after(client: httpx.AsyncClient, settle_s: float) -> int:
    """Requests still in flight once the server had `settle_s` to finish aborted ones."""
    deadline = time.monotonic() + settle_s
    while True:
        num = (await client.get("/server_info")).json()["num_requests_in_flight"]
        if num == 0 or time.monotonic() > deadline:
            return num
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def tiny_cluster() -> Iterator[tuple[str, str | None]]:
    """A CPU prefill + decode cluster (tcp KV transfer) on a tiny model built here."""
    from pdserve.config.topology import Topology
    from pdserve.entrypoints.launch import Cluster, _free_port
    from pdserve.tiny_model.build import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny", arch="llama", seed=1)
        topology = Topology.for_model(
            str(model), mode="pd", device="cpu", port=_free_port(), kv_transfer="tcp",
            num_pages=1024, page_size=4,
        )  # fmt: skip
        with Cluster(topology, log_level="warning", start_timeout_s=180) as cluster:
            yield cluster.url, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (else --tiny starts one)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tiny", action="store_true", help="start a CPU cluster on a tiny model")
    parser.add_argument("-n", "--num-requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="slower than this: a hang")
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-errors", type=int, default=0, help="print the N commonest errors")
    args = parser.parse_args()
    if not args.url and not args.tiny:
        parser.error("give --url or --tiny")
    with contextlib.ExitStack() as stack:
        url, api_key = (args.url, args.api_key) if args.url else stack.enter_context(tiny_cluster())
        counts = asyncio.run(soak(url, api_key, args.num_requests, args.concurrency, args))
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    if args.top_errors:
        print(f"most common errors (of {sum(ERROR_KINDS.values())}):")
        for (status, param, shape), num in ERROR_KINDS.most_common(args.top_errors):
            print(f"{num:6d}  {status} {param}: {shape}")
    bad = counts["5xx"] + counts["hang"] + counts["malformed error body"]
    bad += counts["in_flight_after"] + counts["constrained answer invalid"]
    bad += sum(v for k, v in counts.items() if k.startswith("transport error"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
