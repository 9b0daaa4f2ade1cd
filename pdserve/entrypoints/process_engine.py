"""The Engine over the server's own processes: a Cluster started on loopback, driven over /generate.

Same arguments and result shapes as the in-process engine (SGLang's), plus `async_generate`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

_PROGRESS_MIN_PROMPTS = 8
_TIMEOUT = httpx.Timeout(None, connect=10.0)


class ProcessEngine:
    def __init__(self, model_path: str | None, topology: Any = None, **options: Any) -> None:
        from pdserve.config.topology import Topology
        from pdserve.entrypoints.launch import Cluster, _free_port

        if isinstance(topology, (str, os.PathLike)):
            topology = Topology.from_yaml(Path(topology))
        if topology is None:
            if model_path is None:
                raise ValueError("give model_path or topology")
            options.setdefault("port", _free_port())
            topology = Topology.for_model(model_path, mode="mixed", **options)
        elif options:
            raise ValueError(f"with topology=, set options in the topology: {sorted(options)}")
        self.cluster = Cluster(topology, log_level="warning").start()
        self.url = self.cluster.url
        self._client = httpx.Client(base_url=self.url, timeout=_TIMEOUT)

    # ------------------------------------------------------------------ sync

    def generate(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        input_ids: Any = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> Any:
        body = _body(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num, stream)
        if stream:
            return self._stream(body)
        items = prompt if prompt is not None else input_ids
        is_batch = (
            isinstance(items, list)
            and bool(items)
            and (prompt is not None or isinstance(items[0], list))
        )
        if is_batch and len(items) >= _PROGRESS_MIN_PROMPTS:
            return asyncio.run(self._generate_many(body, len(items)))
        return _check(self._client.post("/generate", json=body))

    def _stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", "/generate", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                _check(resp)
            for line in resp.iter_lines():
                chunk = _sse_data(line)
                if chunk is not None:
                    yield chunk

    async def _generate_many(self, body: dict[str, Any], num: int) -> list[dict[str, Any]]:
        from tqdm import tqdm

        bar = tqdm(total=num, desc="generate", unit="req")
        async with httpx.AsyncClient(base_url=self.url, timeout=_TIMEOUT) as client:

            async def one(i: int) -> dict[str, Any]:
                res = await client.post("/generate", json=_pick(body, i))
                bar.update(1)
                return _check(res)

            results = await asyncio.gather(*(one(i) for i in range(num)))
        bar.close()
        return list(results)

    # ------------------------------------------------------------------ async

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        input_ids: Any = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> Any:
        """A result dict (or list); with stream=True an async iterator of chunks."""
        body = _body(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num, stream)
        if stream:
            return self._astream(body)
        async with httpx.AsyncClient(base_url=self.url, timeout=_TIMEOUT) as client:
            return _check(await client.post("/generate", json=body))

    async def _astream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.url, timeout=_TIMEOUT) as client:
            async with client.stream("POST", "/generate", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    _check(resp)
                async for line in resp.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is not None:
                        yield chunk

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        self._client.close()
        self.cluster.stop(grace_s=2.0)

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _body(
    prompt: Any,
    input_ids: Any,
    sampling_params: Any,
    return_logprob: bool,
    top_logprobs_num: int,
    stream: bool,
) -> dict[str, Any]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("give exactly one of prompt or input_ids")
    body: dict[str, Any] = {
        "sampling_params": sampling_params or {},
        "stream": stream,
        "return_logprob": return_logprob or top_logprobs_num > 0,
        "top_logprobs_num": top_logprobs_num,
    }
    if prompt is not None:
        body["text"] = prompt
    else:
        body["input_ids"] = input_ids
    return body


def _pick(body: dict[str, Any], i: int) -> dict[str, Any]:
    """The body of the i-th prompt of a batch body."""
    one = dict(body)
    key = "text" if "text" in body else "input_ids"
    one[key] = body[key][i]
    if isinstance(body["sampling_params"], list):
        one["sampling_params"] = body["sampling_params"][i]
    return one


def _sse_data(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
    return chunk


def _check(resp: httpx.Response) -> Any:
    if resp.status_code == 400:
        raise ValueError(resp.json().get("error", {}).get("message", resp.text))
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text}")
    return resp.json()
