"""The mixed worker's role: both phases in one scheduler (the co-located baseline); every token,
and the end, goes out from here."""

from __future__ import annotations

from pdserve import protocol
from pdserve.kv_transfer.base import TransferStats
from pdserve.scheduler.request import Request
from pdserve.worker.worker_core import WorkerCore
from pdserve.worker.worker_role import Handler, ReqMeta, new_request


class MixedRole:
    reports_finish = True

    def __init__(self, core: WorkerCore) -> None:
        self.core = core

    def handlers(self) -> dict[type, Handler]:
        return {protocol.TokenizedReq: self.on_tokenized}

    def on_tokenized(self, msg: protocol.TokenizedReq) -> list[Request]:
        req = new_request(msg, ReqMeta(msg.tokenizer_idx))
        if msg.embed:
            self.core.add_pooled(req)
        else:
            self.core.add(req)
        return []

    def on_abort(self, rid: str, message: str) -> list[Request]:
        self.core.abort(rid, message)
        return []

    def rids(self) -> list[str]:
        return list(self.core.scheduler.requests)

    def uses_lora(self, name: str) -> bool:
        return self.core.scheduler.lora_in_use(name)

    def before_step(self, now: float) -> list[Request]:
        return []

    def after_step(self, touched: list[Request]) -> None:
        pass

    def has_work(self) -> bool:
        return False

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def transfer_stats(self) -> TransferStats | None:
        return None

    def close(self) -> None:
        pass
