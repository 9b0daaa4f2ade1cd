"""The Engine over the server's own processes: a Cluster started on loopback, driven over /generate.

Same arguments and result shapes as the in-process engine (SGLang's), plus `async_generate`;
`get_server_info` and `flush_cache` ask the router's `/server_info` and `/flush_cache`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from pdserve.config.engine_config import EngineOptions

_PROGRESS_MIN_PROMPTS = 8
_TIMEOUT = httpx.Timeout(None, connect=10.0)
_ROUTER_ADDRESS = ("host", "port")  # the options a topology= engine takes beside the file


class ProcessEngine:
    def __init__(self, model_path: str | None, topology: Any = None, **options: Any) -> None:
        from pdserve.config.topology import Topology
        from pdserve.entrypoints.launch import Cluster, _free_port

        self.options, options = EngineOptions.split(options)
        if isinstance(topology, (str, os.PathLike)):
            topology = Topology.from_yaml(Path(topology))
        if topology is None:
            if model_path is None:
                raise ValueError("give model_path or topology")
            options.setdefault("port", _free_port())
            topology = Topology.for_model(model_path, mode="mixed", **options)
        else:
            others = sorted(set(options) - set(_ROUTER_ADDRESS))
            if others:
                raise ValueError(
                    f"with topology=, set options in the topology: {others} (only host and "
                    "port may override its router section)"
                )
            topology = topology.with_router_address(options.get("host"), options.get("port"))
        self.cluster = Cluster(topology, log_level=self.options.log_level or "warning").start()
        self.url = self.cluster.url
        api_key = self.cluster.topology.router.api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = self._http(httpx.Client)

    def _http(self, client_class: type[Any]) -> Any:
        """An httpx client (sync or async) of the router, with its API key when it has one."""
        return client_class(base_url=self.url, timeout=_TIMEOUT, headers=self._headers)

    # ------------------------------------------------------------------ sync

    def generate(
        self,
        prompt: Any = None,
        sampling_params: Any = None,
        input_ids: Any = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> Any:
        body = self._request_body(
            prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
            return_hidden_states=return_hidden_states, lora_path=lora_path,
            image_data=image_data, video_data=video_data,
        )  # fmt: skip
        if stream:
            return self._stream({**body, "stream": True})
        items = prompt if prompt is not None else input_ids
        is_batch = (
            isinstance(items, list)
            and bool(items)
            and (prompt is not None or isinstance(items[0], list))
        )
        if is_batch and len(items) >= _PROGRESS_MIN_PROMPTS:
            return self._shaped(asyncio.run(self._generate_many(body, len(items))))
        return self._shaped(_check(self._client.post("/generate", json=body)))

    def _stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", "/generate", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                _check(resp)
            for line in resp.iter_lines():
                chunk = _sse_data(line)
                if chunk is not None:
                    yield self._shaped(chunk)

    async def _generate_many(self, body: dict[str, Any], num: int) -> list[dict[str, Any]]:
        from tqdm import tqdm

        bar = tqdm(total=num, desc="generate", unit="req")
        async with self._http(httpx.AsyncClient) as client:

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
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> Any:
        """A result dict (or list); with stream=True an async iterator of chunks."""
        body = self._request_body(
            prompt, input_ids, sampling_params, return_logprob, top_logprobs_num,
            return_hidden_states=return_hidden_states, lora_path=lora_path,
            image_data=image_data, video_data=video_data,
        )  # fmt: skip
        if stream:
            return self._astream({**body, "stream": True})
        async with self._http(httpx.AsyncClient) as client:
            return self._shaped(_check(await client.post("/generate", json=body)))

    async def _astream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self._http(httpx.AsyncClient) as client:
            async with client.stream("POST", "/generate", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    _check(resp)
                async for line in resp.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is not None:
                        yield self._shaped(chunk)

    # ------------------------------------------------------------------ embeddings

    def encode(self, prompt: Any = None, input_ids: Any = None) -> Any:
        """SGLang's Engine.encode (an embedding or reward model), over the router's `/encode`:
        `{"embedding": [...], "meta_info": {...}}` for one prompt, a list for a list."""
        body = self._encode_body(prompt, input_ids)
        return _check(self._client.post("/encode", json=body))

    async def async_encode(self, prompt: Any = None, input_ids: Any = None) -> Any:
        """`encode`, awaited."""
        body = self._encode_body(prompt, input_ids)
        async with self._http(httpx.AsyncClient) as client:
            return _check(await client.post("/encode", json=body))

    def _encode_body(self, prompt: Any, input_ids: Any) -> dict[str, Any]:
        self.options.check_inputs(prompt, None)
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        return {"text": prompt} if prompt is not None else {"input_ids": input_ids}

    # ------------------------------------------------------------------ server state

    def get_server_info(self) -> dict[str, Any]:
        """The router's `/server_info`: model, context length, topology, each process's load."""
        return _check(self._client.get("/server_info"))

    def flush_cache(self) -> bool:
        """Drop every unlocked prefix-cache page on every worker (the router's `/flush_cache`).
        True when the router sent the flush, as SGLang's `flush_cache().success`."""
        _check(self._client.post("/flush_cache"), is_json=False)
        return True

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        """Load an adapter on every worker: `{success, error_message, loaded_adapters}`."""
        body = {"lora_name": lora_name, "lora_path": lora_path}
        return self._client.post("/load_lora_adapter", json=body).json()

    def unload_lora_adapter(self, lora_name: str) -> dict[str, Any]:
        """Unload an adapter everywhere (waits for its requests in flight)."""
        return self._client.post("/unload_lora_adapter", json={"lora_name": lora_name}).json()

    # ------------------------------------------------------------------ request shapes

    def _request_body(
        self,
        prompt: Any,
        input_ids: Any,
        sampling_params: Any,
        return_logprob: bool,
        top_logprobs_num: int,
        return_hidden_states: bool = False,
        lora_path: str | list[str | None] | None = None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> dict[str, Any]:
        """The /generate body for one generate() call (both the sync and the async one)."""
        self.options.check_inputs(prompt, sampling_params)
        body = _body(prompt, input_ids, sampling_params, return_logprob, top_logprobs_num, False)
        if self.options.skip_tokenizer_init:  # logprob entries carry no text either
            body["return_text_in_logprobs"] = False
        body["return_hidden_states"] = return_hidden_states
        body["lora_path"] = lora_path
        if image_data is not None:  # SGLang's: per prompt a string or a list of them
            body["image_data"] = image_data
        if video_data is not None:  # per prompt a video (a string or a list of frames) or a list
            body["video_data"] = video_data
        return body

    def _shaped(self, result: Any) -> Any:
        """A result (or list of results, or chunk) as this engine returns it: without `text`
        when the tokenizer is skipped, as SGLang's."""
        if self.options.skip_tokenizer_init:
            for one in result if isinstance(result, list) else [result]:
                one.pop("text", None)
        return result

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
    if isinstance(body.get("lora_path"), list):
        one["lora_path"] = body["lora_path"][i]
    if isinstance(body.get("image_data"), list):
        one["image_data"] = body["image_data"][i]
    if isinstance(body.get("video_data"), list):
        one["video_data"] = body["video_data"][i]
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


def _check(resp: httpx.Response, is_json: bool = True) -> Any:
    if resp.status_code == 400:
        raise ValueError(resp.json().get("error", {}).get("message", resp.text))
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text}")
    return resp.json() if is_json else resp.text
