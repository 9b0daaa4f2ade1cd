"""The router's LoRA adapter registry: which adapters every worker has loaded, what a request's
`model` or `lora_path` names, and live `/load_lora_adapter` / `/unload_lora_adapter`.

An adapter is usable only once every worker acknowledged loading it (`LoraUpdate` broadcast,
one `LoraUpdateDone` per worker). A failed load is undone on the workers that succeeded. Unloading
first stops new requests naming it, waits for the router's requests in flight under it to end (a
request on its way through a tokenizer is on no worker yet: unloading there first would fail it),
then asks again until no worker has requests using it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from pdserve.config.lora_config import LoraConfig, lora_names_for, lora_reply
from pdserve.config.router_spec import RouterSpec
from pdserve.protocol import GenerateReq, LoraUpdate, LoraUpdateDone
from pdserve.router.errors import APIError

logger = logging.getLogger(__name__)

_REPLY_TIMEOUT_S = 60.0  # one worker's answer to a load (reading the weights) or an unload
_UNLOAD_WAIT_S = 60.0  # how long an unload waits for the adapter's requests in flight
_UNLOAD_RETRY_S = 0.2


class LoraRegistry:
    """Adapter names usable on every worker, and the pending broadcasts' answers."""

    def __init__(
        self,
        spec: RouterSpec,
        send_all: Callable[[Any], list[str]],
        in_flight: Callable[[str], bool],
    ) -> None:
        self.spec = spec
        self._send_all = send_all  # sends a message to every worker; returns their names
        self._in_flight = in_flight  # whether a request the router tracks runs under an adapter
        lora = LoraConfig.from_options(dict(spec.topology.get("lora") or {}))
        self.adapters: dict[str, str] = {ref.name: ref.path for ref in lora.lora_paths}
        self._waiting: dict[str, tuple[set[str], dict[str, LoraUpdateDone], asyncio.Event]] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time

    # ------------------------------------------------------------------ names in requests

    def resolve_model(self, model: str | None) -> str | None:
        """The adapter an OpenAI `model` names (None: the base model); 400 model_not_found
        for a name that is neither the served model nor a loaded adapter."""
        base_names = (self.spec.model_name, self.spec.model_path)
        if model is None or model in base_names:
            return None
        base, sep, name = model.rpartition(":")
        if sep and base in base_names and name in self.adapters:
            return name
        if model in self.adapters:
            return model
        raise APIError(
            f"The model `{model}` does not exist. This server serves `{self.spec.model_name}` "
            f"and the LoRA adapters {sorted(self.adapters)}.",
            400,
            param="model",
            code="model_not_found",
        )

    def check_names(self, names: list[str | None]) -> None:
        """400 naming the first adapter in `names` that is not loaded."""
        for name in names:
            if name is not None and name not in self.adapters:
                raise APIError(
                    f"LoRA adapter {name!r} is not loaded: expected one of {sorted(self.adapters)}",
                    400,
                    param="lora_path",
                )

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        """/v1/models entries of the loaded adapters, each with its base as `parent`."""
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "pdserve",
             "root": path, "parent": self.spec.model_name}
            for name, path in self.adapters.items()
        ]  # fmt: skip

    # ------------------------------------------------------------------ load and unload

    def deliver(self, done: LoraUpdateDone) -> None:
        """A worker's answer to a broadcast (late ones are dropped)."""
        waiting = self._waiting.get(done.op_id)
        if waiting is None:
            return
        expected, answers, event = waiting
        answers[done.worker] = done
        if expected <= set(answers):
            event.set()

    async def load(self, name: str, path: str) -> dict[str, Any]:
        async with self._lock:
            if name in self.adapters:
                return lora_reply(False, f"LoRA adapter {name!r} is already loaded", self.names)
            answers = await self._broadcast(LoraUpdate("", "load", name, path))
            failed = [a for a in answers if not a.success]
            if failed:
                undo = [a.worker for a in answers if a.success]
                if undo:
                    await self._broadcast(LoraUpdate("", "unload", name))
                return lora_reply(False, failed[0].error, self.names)
            self.adapters[name] = path
            logger.info("LoRA adapter %s loaded on every worker from %s", name, path)
            return lora_reply(True, "", self.names)

    async def unload(self, name: str) -> dict[str, Any]:
        async with self._lock:
            if name not in self.adapters:
                return lora_reply(False, f"LoRA adapter {name!r} is not loaded", self.names)
            path = self.adapters.pop(name)  # no new request may name it from here on
            deadline = asyncio.get_running_loop().time() + _UNLOAD_WAIT_S
            while self._in_flight(name):
                if asyncio.get_running_loop().time() > deadline:
                    self.adapters[name] = path
                    message = f"LoRA adapter {name!r} is in use by requests in flight"
                    return lora_reply(False, message, self.names)
                await asyncio.sleep(_UNLOAD_RETRY_S)
            pending = None
            while True:
                answers = await self._broadcast(LoraUpdate("", "unload", name), pending)
                busy = [a for a in answers if not a.success and "in use" in a.error]
                other = [a for a in answers if not a.success and a not in busy]
                if other:
                    logger.warning("unload of %s: %s", name, other[0].error)
                if not busy:
                    logger.info("LoRA adapter %s unloaded", name)
                    return lora_reply(True, "", self.names)
                if asyncio.get_running_loop().time() > deadline:
                    self.adapters[name] = path
                    return lora_reply(False, busy[0].error, self.names)
                pending = {a.worker for a in busy}
                await asyncio.sleep(_UNLOAD_RETRY_S)

    async def push_to(self, worker: str) -> str | None:
        """Load every adapter the cluster serves onto `worker`, which joined after they were
        loaded; the first problem (an adapter it could not load, no answer), or None."""
        async with self._lock:
            for name, path in list(self.adapters.items()):
                try:
                    answers = await self._broadcast(LoraUpdate("", "load", name, path), {worker})
                except APIError as e:
                    return f"LoRA adapter {name!r}: {e.message}"
                failed = [a for a in answers if not a.success and "already" not in a.error]
                if failed:
                    return f"LoRA adapter {name!r}: {failed[0].error}"
        return None

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    async def _broadcast(
        self, msg: LoraUpdate, only: set[str] | None = None
    ) -> list[LoraUpdateDone]:
        """Send `msg` to every worker (or those in `only`) and wait for each one's answer."""
        msg.op_id = uuid.uuid4().hex
        event = asyncio.Event()
        answers: dict[str, LoraUpdateDone] = {}
        self._waiting[msg.op_id] = (set(), answers, event)
        try:
            expected = set(self._send_all(msg, only))
            self._waiting[msg.op_id] = (expected, answers, event)
            if expected and not expected <= set(answers):
                await asyncio.wait_for(event.wait(), _REPLY_TIMEOUT_S)
        except TimeoutError:
            silent = sorted(expected - set(answers))
            raise APIError(f"workers {silent} did not answer the LoRA {msg.action}", 503) from None
        finally:
            self._waiting.pop(msg.op_id, None)
        return list(answers.values())


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str


def register_lora_routes(app: FastAPI, registry: Callable[[], LoraRegistry]) -> None:
    """POST /load_lora_adapter and /unload_lora_adapter (SGLang's shapes; 400 on failure), also
    under vLLM's /v1/ paths."""

    @app.post("/load_lora_adapter")
    @app.post("/v1/load_lora_adapter")  # vLLM's path, the same body
    async def load_lora_adapter(body: LoadLoraRequest) -> Response:
        reply = await registry().load(body.lora_name, body.lora_path)
        return JSONResponse(reply, status_code=200 if reply["success"] else 400)

    @app.post("/unload_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> Response:
        reply = await registry().unload(body.lora_name)
        status = 200 if reply["success"] else 404 if "not loaded" in reply["error_message"] else 400
        return JSONResponse(reply, status_code=status)


# ---------------------------------------------------------------------- a request's adapter


def openai_lora(registry: LoraRegistry, body: BaseModel) -> str | None:
    """The adapter an OpenAI request runs under: its `model` (`NAME` or `BASE:NAME`), else an
    `extra_body` `lora_path` naming one; None for the base model."""
    lora = registry.resolve_model(getattr(body, "model", None))
    extra = (body.model_extra or {}).get("lora_path")
    if lora is None and extra is not None:
        if not isinstance(extra, str):
            raise APIError(
                f"lora_path={extra!r} is invalid: expected an adapter name", 400, "lora_path"
            )
        registry.check_names([extra])
        lora = extra
    return lora


def generate_loras(
    registry: LoraRegistry, lora_path: Any, route_keys: list[int]
) -> list[str | None]:
    """/generate's `lora_path` (a name, or a list aligned with the prompts) for each
    sub-request; route_keys[i] is sub-request i's prompt index."""
    num_prompts = max(route_keys, default=-1) + 1
    try:
        per_prompt = lora_names_for(lora_path, num_prompts)
    except ValueError as e:
        raise APIError(str(e), 400, param="lora_path") from None
    registry.check_names(per_prompt)
    return [per_prompt[key] for key in route_keys]


def set_lora(reqs: list[GenerateReq], names: list[str | None]) -> None:
    for req, name in zip(reqs, names):
        req.lora_name = name
