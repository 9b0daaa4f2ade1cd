"""KV transfer of a tensor-parallel worker, rank to rank (tcp, nccl and cuda_ipc backends).

Every rank has its own sender (prefill) or receiver (decode) over its own share of the pool
(kv_transfer/head_map.RankKVShare) and its own sockets; the prefill ranks send each decode rank
the heads it owns (head_map.head_routes), straight to that rank (its socket over tcp, a pair
process group over nccl: NCCL on GPUs, gloo on CPU pools; over cuda_ipc a copy into that rank's
pool, opened through its IPC handle), so no page passes through another rank and each decode
rank lands only its heads. Rank 0 coordinates: it alone
talks to the router and to the other workers (PrefillTask, KVReady stay on rank 0), and tells its
followers what to do through the per-step broadcast (batch_broadcast.Command.KV, a msgpack
payload):

| op | when (rank 0) | a follower |
|---|---|---|
| open_sender / open_receiver | the role starts | opens its own sender / receiver (its socket; nccl: its store too); receivers all-gather their handshakes: rank 0's lists them (`ranks`) |
| send | a step's prompts are done (send_many) | connects to new decode workers, sends its heads of the listed pages; all-gather of bytes sent per transfer (-1: failed) |
| poll | each step (while transfers are pending) | applies rank 0's expect / cancel, lands what its socket received; all-gather of each pending request's state on each rank |

A request's KV has arrived when every decode rank has all its heads of all its pages; it failed
when any rank failed it (rank 0 then cancels it on every rank). A follower applies a cancel before
it lands anything newer (ops first, then its socket), so pages freed on rank 0 are never written
by a late chunk on another rank. The earlier relay through rank 0 (every page gathered to and
scattered from rank 0's host) is gone.

cuda_ipc: the decode ranks' handshakes (each rank's pool IPC handle) are all-gathered at
open_receiver as for tcp/nccl; each prefill rank opens the pools of the decode ranks it feeds
when rank 0's `send` names a new decode worker, copies its heads of the pages into each (see
CudaIpcSender), and waits for its copies before the all-gather of bytes sent. So rank 0's
KVReady or KVFailed follows every rank's last write, as at tp 1; on the decode side nothing
arrives to poll and the followers get no op after open_receiver (TPCudaIpcReceiver).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
import torch

from pdserve.kv_transfer import make_receiver, make_sender
from pdserve.kv_transfer.base import (
    KVReceiver,
    KVSender,
    KVTransferError,
    PagePush,
    Transfer,
    TransferFailure,
)
from pdserve.kv_transfer.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from pdserve.kv_transfer.head_map import RankKVShare
from pdserve.kv_transfer.nccl import NcclReceiver, NcclSender
from pdserve.kv_transfer.tcp import TcpReceiver, TcpSender
from pdserve.worker.parallel.batch_broadcast import Command, Header, receive_tensor, send_header
from pdserve.worker.parallel.tp_group import TPGroup

logger = logging.getLogger(__name__)

_PENDING, _DONE, _FAILED = 0, 1, 2  # a request's KV on one decode rank


def share_of(runner: Any) -> RankKVShare:
    """This rank's share of the worker's pool, for its transfer backend."""
    return RankKVShare(
        runner.kv_pool.buffer, runner.tp.rank, runner.tp.size, runner.model_config.num_kv_heads
    )


def make_tp_sender(backend: str, runner: Any, **options: Any) -> KVSender:
    """Rank 0 of a tensor-parallel prefill worker: its sender, which drives the followers'."""
    cls = {"tcp": TPTcpSender, "nccl": TPNcclSender, "cuda_ipc": TPCudaIpcSender}.get(backend)
    if cls is None:
        raise _bad_backend(backend)
    return cls(share_of(runner), runner.tp, runner.device, **options)


def make_tp_receiver(
    backend: str, runner: Any, address: str | None = None, **options: Any
) -> KVReceiver:
    """Rank 0 of a tensor-parallel decode worker: its receiver, which drives the followers'."""
    cls = {"tcp": TPTcpReceiver, "nccl": TPNcclReceiver, "cuda_ipc": TPCudaIpcReceiver}.get(backend)
    if cls is None:
        raise _bad_backend(backend)
    return cls(share_of(runner), runner.tp, runner.device, address, **options)


def _bad_backend(backend: str) -> ValueError:
    return ValueError(
        f"kv_transfer backend {backend!r} is invalid for a tensor-parallel worker: expected "
        "'tcp', 'nccl' or 'cuda_ipc'"
    )


# ---------------------------------------------------------------------------- the wire


def announce(tp: TPGroup, device: torch.device, payload: dict[str, Any]) -> None:
    """Rank 0: tell every follower to run a KV op (Command.KV, then the msgpack payload)."""
    blob = msgpack.packb(payload, use_bin_type=True)
    send_header(tp, Header(Command.KV, num_tokens=len(blob)), device)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    tp.broadcast_from_first(data)


def receive_payload(tp: TPGroup, header: Header, device: torch.device) -> dict[str, Any]:
    """A follower: the payload of a Command.KV header."""
    data = receive_tensor(tp, (header.num_tokens,), torch.uint8, device)
    return msgpack.unpackb(data.cpu().numpy().tobytes(), raw=False, strict_map_key=False)


def gather_handshakes(
    tp: TPGroup, handshake: dict[str, Any], device: torch.device
) -> list[dict[str, Any]]:
    """Every rank's receiver handshake, in rank order (msgpack, padded to the longest)."""
    raw = msgpack.packb(handshake, use_bin_type=True)
    lengths = tp.all_gather(torch.tensor([len(raw)], dtype=torch.int64).to(device))
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    parts = tp.all_gather(padded.to(device))
    return [
        msgpack.unpackb(p.cpu().numpy().tobytes()[: int(n.item())], raw=False)
        for p, n in zip(parts, lengths, strict=True)
    ]


def follower_address(address: str | None) -> str | None:
    """Where a follower binds, given rank 0's bind address: the same tcp host on a free port,
    or a fresh ipc:// one."""
    if address is None or not address.startswith("tcp://"):
        return None
    host, _, _ = address.removeprefix("tcp://").rpartition(":")
    return f"tcp://{host}:*"


# ---------------------------------------------------------------------------- rank 0


class _TPSender(KVSender):
    """Rank 0's sender: sends its own heads, and has every follower send its heads of the same
    pages at the same time; a transfer succeeds when every rank's part was sent."""

    def _start_followers(self, tp: TPGroup, device: torch.device, options: dict) -> None:
        self.tp = tp
        self.device = device
        self._told: dict[int, dict[str, Any]] = {}  # the handshakes the followers connected to
        payload = {"op": "open_sender", "backend": self.backend_name, "options": options}
        announce(tp, device, payload)

    def _send_pushes(self, pushes: list[PagePush], deadline: float) -> list[int | Exception]:
        connect = []
        for idx in sorted({p.transfer.decode_idx for p in pushes}):
            if self._told.get(idx) != self._connected[idx]:
                connect.append([idx, self._connected[idx]])
                self._told[idx] = self._connected[idx]
        transfers = [
            [t.rid, t.decode_idx, list(t.src_pages), list(t.dst_pages)]
            for t in (p.transfer for p in pushes)
        ]
        timeout_s = max(deadline - time.perf_counter(), 0.0)
        payload = {"op": "send", "connect": connect, "transfers": transfers, "timeout_s": timeout_s}
        announce(self.tp, self.device, payload)
        mine = super()._send_pushes(pushes, deadline)
        codes = torch.tensor([m if isinstance(m, int) else -1 for m in mine], dtype=torch.int64)
        by_rank = [part.cpu().tolist() for part in self.tp.all_gather(codes.to(self.device))]
        out: list[int | Exception] = []
        for i, push in enumerate(pushes):
            if isinstance(mine[i], Exception):
                out.append(mine[i])
                continue
            failed = [r for r in range(self.tp.size) if by_rank[r][i] < 0]
            if failed:
                t = push.transfer
                out.append(
                    KVTransferError(
                        f"request {t.rid}: KV transfer to decode {t.decode_idx} failed on "
                        f"tensor-parallel rank(s) {failed} (their logs say why)"
                    )
                )
                continue
            out.append(sum(by_rank[r][i] for r in range(self.tp.size)))
        return out

    def close(self) -> None:
        super().close()
        self._told.clear()


class TPTcpSender(_TPSender, TcpSender):
    def __init__(
        self, share: RankKVShare, tp: TPGroup, device: torch.device, **options: Any
    ) -> None:
        TcpSender.__init__(self, share, **options)
        self._start_followers(tp, device, options)


class TPNcclSender(_TPSender, NcclSender):
    def __init__(
        self, share: RankKVShare, tp: TPGroup, device: torch.device, **options: Any
    ) -> None:
        NcclSender.__init__(self, share, **options)
        self._start_followers(tp, device, options)


class TPCudaIpcSender(_TPSender, CudaIpcSender):
    """Each rank copies its heads straight into the decode ranks' pools it opened; rank 0 reports
    the transfer done only once every rank's copies have finished (the all-gather of bytes sent
    follows each rank's wait), so the KVReady it sends next is the decode worker's signal."""

    def __init__(
        self, share: RankKVShare, tp: TPGroup, device: torch.device, **options: Any
    ) -> None:
        CudaIpcSender.__init__(self, share, **options)
        self._start_followers(tp, device, options)


class _TPReceiver(KVReceiver):
    """Rank 0's receiver: lands its own heads, mirrors expect / cancel to the followers, and
    reports a request arrived once every rank has all its heads."""

    def _start_followers(
        self, tp: TPGroup, device: torch.device, address: str | None, options: dict
    ) -> None:
        self.tp = tp
        self.device = device
        options = {k: v for k, v in options.items() if k != "store_port"}  # theirs: any free one
        payload = {
            "op": "open_receiver",
            "backend": self.handshake()["backend"],
            "address": follower_address(address),
            "options": options,
        }
        announce(tp, device, payload)
        self.ranks = gather_handshakes(tp, self.handshake(), device)
        self._ops: list[list[Any]] = []  # expect / cancel, for the followers' next poll
        self._tp_pending: dict[str, None] = {}  # rids not yet arrived or failed on every rank
        self._done_here: set[str] = set()  # pending rids rank 0 has all its heads of
        self._failed_here: dict[str, str] = {}
        self._tp_failures: list[TransferFailure] = []

    def handshake(self) -> dict[str, Any]:
        own = super().handshake()
        ranks = getattr(self, "ranks", None)
        return own if ranks is None else {**own, "ranks": ranks}

    def expect(self, rid: str, dst_pages: list[int]) -> None:
        super().expect(rid, dst_pages)  # raises before anything is recorded
        self._ops.append(["expect", rid, list(dst_pages)])
        self._tp_pending[rid] = None

    def cancel(self, rid: str) -> None:
        super().cancel(rid)
        self._ops.append(["cancel", rid])
        self._tp_pending.pop(rid, None)
        self._done_here.discard(rid)
        self._failed_here.pop(rid, None)

    def is_expecting(self, rid: str) -> bool:
        return rid in self._tp_pending

    def poll(self) -> list[str]:
        self._drain()  # rank 0's own socket
        self._done_here.update(rid for rid in self._arrived if rid in self._tp_pending)
        self._arrived = []
        for failure in self._failures:
            self._failed_here[failure.rid] = failure.error
        self._failures = []
        if not self._tp_pending and not self._ops:
            return []  # nothing to land anywhere: no broadcast
        pending = list(self._tp_pending)
        announce(self.tp, self.device, {"op": "poll", "ops": self._ops, "pending": pending})
        self._ops = []
        if not pending:
            return []
        mine = [
            _FAILED if rid in self._failed_here else _DONE if rid in self._done_here else _PENDING
            for rid in pending
        ]
        parts = self.tp.all_gather(torch.tensor(mine, dtype=torch.int64).to(self.device))
        by_rank = [part.cpu().tolist() for part in parts]
        arrived = []
        for i, rid in enumerate(pending):
            states = [by_rank[r][i] for r in range(self.tp.size)]
            if _FAILED in states:
                rank = states.index(_FAILED)
                error = self._failed_here.get(rid) if rank == 0 else None
                error = error or f"KV transfer failed on tensor-parallel rank {rank} (its log)"
                self._tp_failures.append(TransferFailure(rid, error))
                self.cancel(rid)  # every rank forgets it: no later chunk lands
                continue
            if all(s == _DONE for s in states):
                arrived.append(rid)
                self._tp_pending.pop(rid)
                self._done_here.discard(rid)
        return arrived

    def take_failures(self) -> list[TransferFailure]:
        failures, self._tp_failures = self._tp_failures, []
        return failures


class TPTcpReceiver(_TPReceiver, TcpReceiver):
    def __init__(
        self,
        share: RankKVShare,
        tp: TPGroup,
        device: torch.device,
        address: str | None = None,
        **options: Any,
    ) -> None:
        TcpReceiver.__init__(self, share, address, **options)
        self._start_followers(tp, device, address, options)


class TPNcclReceiver(_TPReceiver, NcclReceiver):
    def __init__(
        self,
        share: RankKVShare,
        tp: TPGroup,
        device: torch.device,
        address: str | None = None,
        **options: Any,
    ) -> None:
        NcclReceiver.__init__(self, share, address, **options)
        self._start_followers(tp, device, address, options)


class TPCudaIpcReceiver(CudaIpcReceiver):
    """Rank 0's cuda_ipc receiver: each rank shares its own pool's IPC handle once (gathered into
    rank 0's handshake as `ranks`), and the prefill ranks write into them directly. Nothing
    arrives to poll on any rank, so after opening, the followers are never asked anything: the
    prefill's KVReady is the signal (and pages of an ended request stay HELD until it comes)."""

    def __init__(
        self,
        share: RankKVShare,
        tp: TPGroup,
        device: torch.device,
        address: str | None = None,
        **options: Any,
    ) -> None:
        if address is not None or options:
            raise ValueError("cuda_ipc receivers take no address or options")
        CudaIpcReceiver.__init__(self, share)
        payload = {"op": "open_receiver", "backend": "cuda_ipc", "address": None, "options": {}}
        announce(tp, device, payload)
        self.ranks = gather_handshakes(tp, super().handshake(), device)

    def handshake(self) -> dict[str, Any]:
        return {**super().handshake(), "ranks": self.ranks}


# ---------------------------------------------------------------------------- followers


class FollowerKV:
    """A follower's side of the KV transfer: its sender or receiver, driven by rank 0's ops."""

    def __init__(self, tp: TPGroup, local: torch.Tensor, num_kv_heads: int, device: Any) -> None:
        self.tp = tp
        self.share = RankKVShare(local, tp.rank, tp.size, num_kv_heads)
        self.device = device
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        self._done: set[str] = set()
        self._failed: set[str] = set()

    @classmethod
    def of(cls, runner: Any) -> FollowerKV:
        return cls(
            runner.tp, runner.kv_pool.buffer, runner.model_config.num_kv_heads, runner.device
        )

    def run(self, header: Header) -> None:
        payload = receive_payload(self.tp, header, self.device)
        op = payload.get("op")
        if op == "open_sender":
            self.sender = make_sender(payload["backend"], self.share, **payload["options"])
        elif op == "open_receiver":
            backend, address = payload["backend"], payload["address"]
            self.receiver = make_receiver(backend, self.share, address, **payload["options"])
            gather_handshakes(self.tp, self.receiver.handshake(), self.device)
        elif op == "send":
            self._send(payload)
        elif op == "poll":
            self._poll(payload)
        else:
            raise ValueError(f"KV op {op!r} is invalid: expected open_sender, open_receiver, ...")

    def _send(self, payload: dict[str, Any]) -> None:
        if self.sender is None:
            raise RuntimeError("KV send before open_sender")
        broken: set[int] = set()
        for idx, handshake in payload["connect"]:
            try:
                self.sender.connect(idx, handshake)
            except Exception:
                logger.exception("rank %d: connecting to decode %d failed", self.tp.rank, idx)
                broken.add(idx)
        transfers = [Transfer(rid, idx, src, dst) for rid, idx, src, dst in payload["transfers"]]
        ok = [t for t in transfers if t.decode_idx not in broken]
        outcomes = iter(self.sender.send_many(ok, payload["timeout_s"]) if ok else [])
        codes = []
        for t in transfers:
            outcome = next(outcomes) if t.decode_idx not in broken else None
            if isinstance(outcome, tuple):  # TransferResult
                codes.append(outcome.num_bytes)
                continue
            logger.error("rank %d: request %s: KV send failed: %s", self.tp.rank, t.rid, outcome)
            codes.append(-1)
        self.tp.all_gather(torch.tensor(codes, dtype=torch.int64).to(self.device))

    def _poll(self, payload: dict[str, Any]) -> None:
        receiver = self.receiver
        if receiver is None:
            raise RuntimeError("KV poll before open_receiver")
        for op in payload["ops"]:  # first: a cancelled request's pages take nothing more
            if op[0] == "expect":
                try:
                    receiver.expect(op[1], op[2])
                except ValueError as e:
                    logger.error("rank %d: %s", self.tp.rank, e)
                    self._failed.add(op[1])
            else:
                receiver.cancel(op[1])
                self._done.discard(op[1])
                self._failed.discard(op[1])
        self._done.update(receiver.poll())
        self._failed.update(f.rid for f in receiver.take_failures())
        pending = payload["pending"]
        if not pending:
            return
        states = [
            _FAILED if rid in self._failed else _DONE if rid in self._done else _PENDING
            for rid in pending
        ]
        self.tp.all_gather(torch.tensor(states, dtype=torch.int64).to(self.device))
        keep = set(pending)
        self._done &= keep
        self._failed &= keep

    def close(self) -> None:
        for part in (self.sender, self.receiver):
            if part is not None:
                part.close()
