"""The embeddings mode of `pdserve bench serve` (`--endpoint embeddings`): one non-streamed
`/v1/embeddings` request per prompt; its latency is the whole round trip, and the server's
`usage.prompt_tokens` (else the dataset's length) counts its input tokens."""

from __future__ import annotations

import time
from typing import Any

import httpx

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.stats import RequestResult

ENCODING_FORMATS = ("float", "base64")


def build_embedding_payload(model: str, req: BenchRequest, encoding_format: str) -> dict[str, Any]:
    """One input (text or token ids) per request, as most embedding clients send it."""
    return {"model": model, "input": req.prompt, "encoding_format": encoding_format}


def _vector_error(body: dict[str, Any]) -> str | None:
    """Why an answer carries no usable vector; None when it carries exactly one."""
    data = body.get("data")
    if not isinstance(data, list) or len(data) != 1:
        count = len(data) if isinstance(data, list) else "no"
        return f"expected one embedding, got {count}"
    if not (data[0] or {}).get("embedding"):
        return "an empty embedding"
    return None


async def send_embedding_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], prompt_len: int
) -> RequestResult:
    """POST one embeddings request; never raises: any failure is the result's `error`."""
    result = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    try:
        resp = await client.post(url, json=payload)
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {resp.text.strip()[:300]}"
            return result
        body = resp.json()
    # A benchmark client must survive anything one request does and count it as failed.
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    usage = body.get("usage") or {}
    if usage.get("prompt_tokens") is not None:
        result.prompt_len = int(usage["prompt_tokens"])
    result.error = _vector_error(body)
    return result
