"""The specs the launcher hands its children survive the trip through msgpack, and bad ones are refused."""

from __future__ import annotations

import msgpack
import pytest

from pdserve.config.engine_config import EngineConfig, SchedulerConfig
from pdserve.config.process_specs import KVTransferSpec, TokenizerSpec, WorkerSpec


def _worker() -> WorkerSpec:
    return WorkerSpec(
        name="decode1",
        role="decode",
        idx=1,
        engine=EngineConfig(
            model_path="/m", device="cpu", scheduler=SchedulerConfig(page_size=4, num_pages=64)
        ),
        inbox="ipc:///tmp/x/decode1.sock",
        tokenizer_inboxes=("ipc://t0", "ipc://t1"),
        kv=KVTransferSpec(backend="tcp", timeout_s=12.5, address="tcp://0.0.0.0:9", host="h"),
        report_interval_s=0.5,
        router_inbox="ipc://r",
        launcher_inbox=None,
        decode_inboxes=("ipc://d0", "ipc://d1"),
        prefill_inboxes=("ipc://p0",),
    )


def _through_the_pipe(d: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)


def test_worker_spec_round_trips_through_msgpack() -> None:
    spec = _worker()
    assert WorkerSpec.from_dict(_through_the_pipe(spec.to_dict())) == spec


def test_tokenizer_spec_round_trips_through_msgpack() -> None:
    spec = TokenizerSpec(
        name="tokenizer1",
        idx=1,
        model_path="/m",
        inbox="ipc://t1",
        router_inbox="ipc://r",
        worker_inboxes=("ipc://d0",),
        max_context_len=4096,
        launcher_inbox="ipc://l",
    )
    assert TokenizerSpec.from_dict(_through_the_pipe(spec.to_dict())) == spec


def test_unknown_keys_and_bad_values_are_named() -> None:
    d = _worker().to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        WorkerSpec.from_dict({**d, "colour": "red"})
    with pytest.raises(ValueError, match="role='router' is invalid"):
        WorkerSpec.from_dict({**d, "role": "router"})
    with pytest.raises(ValueError, match=r"engine: unknown key\(s\) \['gpu'\]"):
        WorkerSpec.from_dict({**d, "engine": {**d["engine"], "gpu": 1}})
    # no workers yet is valid: with router.membership they join later (PeerTable)
    assert TokenizerSpec("t", 0, "/m", "ipc://t", "ipc://r", (), 0).worker_inboxes == ()
    with pytest.raises(ValueError, match="idx=-1 is invalid"):
        TokenizerSpec("t", -1, "/m", "ipc://t", "ipc://r", (), 0)
