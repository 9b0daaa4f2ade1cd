"""The router's LoRA registry on its own: an unload waits for the router's requests in flight
under the adapter before asking any worker (one still on its way through a tokenizer is on no
worker yet, so the workers' own in-use check cannot see it)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.config.router_spec import RouterSpec, WorkerEntry
from pdserve.protocol import LoraUpdate, LoraUpdateDone
from pdserve.router import lora_adapters
from pdserve.router.errors import APIError
from pdserve.router.lora_adapters import LoraRegistry


def _registry(sent: list[LoraUpdate], in_flight: set[str]) -> LoraRegistry:
    decode = WorkerEntry("decode0", "decode", 0, "ipc:///tmp/unused-decode0")
    spec = RouterSpec("m", "ipc:///tmp/unused", ("ipc:///tmp/unused-tok0",), (decode,))

    def send_all(msg: LoraUpdate, only: set[str] | None = None) -> list[str]:
        sent.append(msg)
        return ["decode0"]

    registry = LoraRegistry(spec, send_all, lambda name: name in in_flight)
    registry.adapters["gamma"] = "/adapters/gamma"
    return registry


def test_unload_asks_workers_only_once_the_routers_requests_under_it_end() -> None:
    async def run() -> None:
        sent: list[LoraUpdate] = []
        in_flight = {"gamma"}
        registry = _registry(sent, in_flight)
        unload = asyncio.create_task(registry.unload("gamma"))
        await asyncio.sleep(3 * lora_adapters._UNLOAD_RETRY_S)
        assert sent == [] and not unload.done()
        with pytest.raises(APIError, match="gamma"):  # no new request may name it meanwhile
            registry.resolve_model("gamma")
        in_flight.clear()
        while not sent:
            await asyncio.sleep(0.01)
        assert (sent[0].action, sent[0].lora_name) == ("unload", "gamma")
        registry.deliver(LoraUpdateDone(sent[0].op_id, "decode0", True, "", []))
        reply = await unload
        assert reply["success"] and reply["loaded_adapters"] == []

    asyncio.run(run())


def test_unload_refused_when_the_routers_requests_outlast_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lora_adapters, "_UNLOAD_WAIT_S", 0.3)
    sent: list[LoraUpdate] = []
    registry = _registry(sent, {"gamma"})
    reply = asyncio.run(registry.unload("gamma"))
    assert not reply["success"] and "in use" in reply["error_message"]
    assert sent == [] and registry.resolve_model("gamma") == "gamma"  # usable again
