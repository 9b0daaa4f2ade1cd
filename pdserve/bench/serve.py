"""`pdserve bench serve`: load any OpenAI-compatible server with streamed requests and measure
TTFT, TPOT, ITL and end-to-end latency per request (like `vllm bench serve`); with an embeddings
endpoint, requests/s, input tokens/s and latency of `/v1/embeddings` (`pdserve.bench.embed`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from pdserve.bench.datasets import BenchRequest, build_requests, load_tokenizer
from pdserve.bench.embed import ENCODING_FORMATS, build_embedding_payload, send_embedding_request
from pdserve.bench.stats import (
    RequestResult,
    ServeSummary,
    format_embed_table,
    format_serve_table,
    summarize_serve,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """One serving benchmark run; the CLI's defaults come from here."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model the server lists at /v1/models
    tokenizer: str | None = None  # None: the model's name; "none": send token ids
    dataset: str = "random"
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    num_prompts: int = 1000
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    num_warmups: int = 0
    vocab_size: int = 256  # random ids are drawn below this when there is no tokenizer
    timeout_s: float = 6 * 3600.0  # one request's read timeout
    disable_tqdm: bool = False
    encoding_format: str = "float"  # embeddings only: "float" lists or "base64" float32 bytes
    num_client_procs: int = 1  # processes sending the load (client_procs.py): one falls behind

    def __post_init__(self) -> None:
        checks = [
            (self.dataset == "random", "dataset", "'random'"),
            (self.input_len >= 1, "input_len", ">= 1"),
            (self.output_len >= 1, "output_len", ">= 1"),
            (0.0 <= self.range_ratio < 1.0, "range_ratio", "in [0, 1)"),
            (self.num_prompts >= 1, "num_prompts", ">= 1"),
            (self.request_rate > 0, "request_rate", "> 0 (inf: all at once)"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency", ">= 1"),
            (self.num_warmups >= 0, "num_warmups", ">= 0"),
            (self.num_client_procs >= 1, "num_client_procs", ">= 1"),
            (self.vocab_size >= 1, "vocab_size", ">= 1"),
            (self.endpoint.startswith("/"), "endpoint", "a path starting with '/'"),
            (self.encoding_format in ENCODING_FORMATS, "encoding_format", str(ENCODING_FORMATS)),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is invalid: expected {expected}")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    @property
    def is_embeddings(self) -> bool:
        return self.endpoint.rstrip("/").endswith("embeddings")


@dataclass
class ServeRun:
    config: ServeConfig
    model: str
    tokenizer: str | None  # what the prompts were built with; None: random token ids
    requests: list[BenchRequest]
    results: list[RequestResult]
    summary: ServeSummary


# ---------------------------------------------------------------------------- one request


def build_payload(config: ServeConfig, model: str, req: BenchRequest) -> dict[str, Any]:
    """Ask for exactly `output_len` tokens (ignore_eos, min_tokens), streamed, with usage; or,
    for an embeddings endpoint, the prompt's vector."""
    if config.is_embeddings:
        return build_embedding_payload(model, req, config.encoding_format)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "min_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.is_chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _error_message(event: dict[str, Any]) -> str | None:
    """The message of an error event (OpenAI `{"error": ...}` or vLLM `{"object": "error"}`)."""
    err = event.get("error")
    if err is not None:
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    if event.get("object") == "error":
        return str(event.get("message", event))
    return None


def _has_token(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


async def send_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], prompt_len: int
) -> RequestResult:
    """Stream one request; never raises: any failure is the result's `error`."""
    result = RequestResult(prompt_len=prompt_len)
    start = last = time.perf_counter()
    num_chunks = 0
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body.strip()[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                now = time.perf_counter()
                if (message := _error_message(event)) is not None:
                    result.error = f"error event: {message}"
                    return result
                usage = event.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    result.prompt_len = int(usage["prompt_tokens"])
                if _has_token(event):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
    # A benchmark client must survive anything one request does and count it as failed.
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.output_len = usage_tokens if usage_tokens is not None else num_chunks
    if num_chunks == 0:  # tokens only in usage (all decoded to ""): the stream's end is all we have
        last = time.perf_counter()
        result.ttft = last - start
    result.e2e = last - start  # to the last token, as vLLM measures it
    if result.output_len == 0:
        result.error = "the stream ended without any token"
    return result


async def send_one(
    client: httpx.AsyncClient, config: ServeConfig, model: str, req: BenchRequest
) -> RequestResult:
    """One request of the run: streamed generation, or one embeddings round trip."""
    payload = build_payload(config, model, req)
    send = send_embedding_request if config.is_embeddings else send_request
    return await send(client, config.endpoint, payload, req.prompt_len)


# ---------------------------------------------------------------------------- the run


async def _arrivals(
    requests: list[BenchRequest], rate: float, rng: np.random.Generator
) -> AsyncIterator[BenchRequest]:
    """Yield requests with exponential gaps (a Poisson process of `rate` per second)."""
    for i, req in enumerate(requests):
        if i > 0 and math.isfinite(rate):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        yield req


async def _run_requests(
    client: httpx.AsyncClient, config: ServeConfig, model: str, requests: list[BenchRequest]
) -> list[RequestResult]:
    from tqdm import tqdm

    gate = asyncio.Semaphore(config.max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc="bench serve", unit="req", disable=config.disable_tqdm)

    async def one(req: BenchRequest) -> RequestResult:
        async with gate:
            result = await send_one(client, config, model, req)
        bar.update(1)
        return result

    tasks = []
    async for req in _arrivals(requests, config.request_rate, np.random.default_rng(config.seed)):
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    bar.close()
    return list(results)


async def _listed_models(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    try:
        resp = await client.get("/v1/models")
        return (resp.json().get("data") or []) if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):  # down, or not an OpenAI model list
        return []


async def _resolve_model(client: httpx.AsyncClient, config: ServeConfig) -> tuple[str, str]:
    """The model name to send, and where its tokenizer is: --tokenizer, else the served model's
    `root` when that is a directory here (vLLM and pdserve list it), else the model name."""
    models = await _listed_models(client)
    if config.model is not None:
        entry = next((m for m in models if m.get("id") == config.model), {"id": config.model})
    elif models:
        entry = models[0]
    else:
        raise ValueError("the server lists no models at /v1/models: pass --model NAME")
    root = entry.get("root")
    local_root = root if isinstance(root, str) and os.path.isdir(root) else None
    return str(entry["id"]), config.tokenizer or local_root or str(entry["id"])


def _load_tokenizer(config: ServeConfig, name: str) -> Any | None:
    if config.tokenizer is not None:
        return load_tokenizer(name)  # asked for by name: failing is an error
    try:
        return load_tokenizer(name)
    except ValueError as e:
        logger.warning("%s; sending prompts as random token ids below %d", e, config.vocab_size)
        return None


def _sample(config: ServeConfig, tokenizer: Any, num: int, seed: int) -> list[BenchRequest]:
    return build_requests(
        tokenizer,
        num,
        config.input_len,
        config.output_len,
        config.range_ratio,
        seed,
        config.vocab_size,
    )


def _client(config: ServeConfig, api_key: str | None) -> httpx.AsyncClient:
    # One pool with a connection per concurrent request, so no request waits for a socket.
    size = config.max_concurrency or config.num_prompts
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=config.base_url.rstrip("/"),
        headers=headers,
        limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        timeout=httpx.Timeout(config.timeout_s, connect=60.0, pool=None),
    )


async def run_serve(config: ServeConfig, api_key: str | None = None) -> ServeRun:
    async with _client(config, api_key) as client:
        model, tokenizer_name = await _resolve_model(client, config)
        tokenizer = _load_tokenizer(config, tokenizer_name)
        if tokenizer is None and config.is_chat:
            raise ValueError("a chat endpoint needs text prompts: pass --tokenizer PATH")
        requests = _sample(config, tokenizer, config.num_prompts, config.seed)
        # Another seed for warm-ups: the measured prompts stay the same and miss their cache.
        for req in _sample(config, tokenizer, config.num_warmups, config.seed + 1):
            await send_one(client, config, model, req)
        if config.num_client_procs > 1:
            from pdserve.bench import client_procs

            results, duration = await asyncio.to_thread(
                client_procs.run_in_processes, config, model, requests, api_key
            )
        else:
            start = time.perf_counter()
            results = await _run_requests(client, config, model, requests)
            duration = time.perf_counter() - start
    summary = summarize_serve(results, duration, config.slo_ttft_ms, config.slo_tpot_ms)
    used = tokenizer_name if tokenizer is not None else None
    return ServeRun(config, model, used, requests, results, summary)


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def run_json(run: ServeRun) -> dict[str, Any]:
    """Everything about a run: config, summary numbers, and per-request lists."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_id": run.model,
        "tokenizer": run.tokenizer,
        "config": {k: _jsonable(v) for k, v in asdict(run.config).items()},
        **run.summary.flat(),
        "input_lens": [r.prompt_len for r in run.results],
        "output_lens": [r.output_len for r in run.results],
        "ttfts": [r.ttft for r in run.results],
        "itls": [r.itl for r in run.results],
        "e2els": [r.e2e for r in run.results],
        "errors_per_request": [r.error for r in run.results],
    }


def handle(args: Any) -> int:
    """`pdserve bench serve`: run, print the table, write --output-json."""
    fields = ServeConfig.__dataclass_fields__
    config = ServeConfig(**{name: getattr(args, name) for name in fields})
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    run = asyncio.run(run_serve(config, api_key))
    table = format_embed_table if config.is_embeddings else format_serve_table
    print(table(run.summary))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(run_json(run), f, indent=2, default=str)
    return 0 if run.summary.completed > 0 else 1
