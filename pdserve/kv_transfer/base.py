"""The KV transfer contract: a receiver in the decode worker, a sender in the prefill worker.

The decode worker reserves destination pages first and registers them (`expect`); the prefill worker
pushes its source pages into them (`send`) and then reports `KVReady` on the control sockets. KV bytes
never ride in control messages. Backends: `tcp.py`, `cuda_ipc.py`, `nccl.py`.
"""

from __future__ import annotations

import array
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

from pdserve.fault_injection import NO_FAULTS, FaultInjector, InjectedFault
from pdserve.kv_transfer.page_copy import (
    check_pages,
    gather_pages,
    page_array,
    page_index,
    scatter_pages,
)

logger = logging.getLogger(__name__)

Backend = Literal["nccl", "cuda_ipc", "tcp"]
BACKENDS: tuple[str, ...] = ("nccl", "cuda_ipc", "tcp")

# Who owns the src pages (prefill pool) and the dst pages (decode pool) of one request at each
# step, including the dst pages a cancelled cuda_ipc transfer keeps reserved (`frees_on_cancel`):
# the one table in docs/ARCHITECTURE.md, "KV page ownership". The decode side's states over them
# are scheduler/kv_handoff.py's (KVHandoff); the prefill side's is worker/prefill_role.py.


class KVTransferError(RuntimeError):
    """A transfer failed or timed out: the caller aborts the request on both sides."""


class TransferResult(NamedTuple):
    num_bytes: int  # payload bytes moved
    seconds: float  # wall time of send()


class TransferFailure(NamedTuple):
    rid: str
    error: str


@dataclass
class TransferStats:
    """Cumulative numbers a sender reports in its load reports."""

    bytes_sent: int = 0
    seconds: float = 0.0
    num_transfers: int = 0  # successful ones
    num_failures: int = 0


class HasKVBuffer(Protocol):
    buffer: torch.Tensor  # [L, 2, num_pages, page_size, Hkv, D]


def kv_buffer_of(pool: torch.Tensor | HasKVBuffer) -> torch.Tensor:
    """The pool tensor [L, 2, num_pages, page_size, Hkv, D] of a KVPool (or the tensor itself)."""
    buffer = pool if isinstance(pool, torch.Tensor) else pool.buffer
    if buffer.dim() != 6 or buffer.shape[1] != 2:
        raise ValueError(
            f"KV pool shape {list(buffer.shape)}: expected [L, 2, num_pages, "
            "page_size, num_kv_heads, head_dim]"
        )
    if not buffer.is_contiguous():
        raise ValueError("KV pool buffer must be contiguous")
    return buffer


# ------------------------------------------------- layout (page ids and copies: page_copy.py)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype name")
    return dtype


def layout_of(buffer: torch.Tensor) -> dict[str, Any]:
    """What two pools must agree on to exchange pages (msgpack-able; part of every handshake)."""
    num_layers, _, num_pages, *page_shape = buffer.shape
    return {
        "dtype": dtype_name(buffer.dtype),
        "num_layers": num_layers,
        "page_shape": list(page_shape),
        "num_pages": num_pages,
    }


def check_same_layout(buffer: torch.Tensor, peer: dict[str, Any], what: str) -> None:
    """Raise ValueError when `peer` (a handshake) describes pages unlike `buffer`'s."""
    mine = layout_of(buffer)
    for key in ("dtype", "num_layers", "page_shape"):
        if list_or_value(peer.get(key)) != list_or_value(mine[key]):
            raise ValueError(
                f"{what}: {key}={peer.get(key)!r}, expected {mine[key]!r} "
                "(prefill and decode pools must have equal page layouts)"
            )


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def staging_shape(buffer: torch.Tensor, num_pages: int) -> list[int]:
    """[L, 2, n, page_size, Hkv, D]: the contiguous form of n pages of `buffer`."""
    return [buffer.shape[0], 2, num_pages, *buffer.shape[3:]]


# ---------------------------------------------------------------------------- the receiver


class KVReceiver(ABC):
    """In the decode worker; owns the destination pool.

    needs_arrival: the worker commits a request only after poll() reported it (besides KVReady).
    frees_on_cancel: after cancel(rid) the worker may free rid's pages at once (see the table).
    """

    needs_arrival: bool = True
    frees_on_cancel: bool = True

    def __init__(self, pool: torch.Tensor | HasKVBuffer) -> None:
        # [L, 2, num_pages, page_size, Hkv, D]; a tensor-parallel rank's share of a pool
        # (head_map.RankKVShare): a meta tensor of the whole layout, its heads in `pool.local`
        self.buffer = kv_buffer_of(pool)
        self.num_pages = self.buffer.shape[2]
        self.local: torch.Tensor = getattr(pool, "local", self.buffer)  # this rank's heads
        self.num_local_heads = self.local.shape[4]
        self._head_masks: dict[str, dict[int, int]] = {}  # rid -> page -> bitmask of heads landed
        self.bytes_received = 0  # payload bytes landed by _land_heads
        self._expected: dict[str, set[int]] = {}  # rid -> its dst pages not landed yet
        self._arrived: list[str] = []
        self._failures: list[TransferFailure] = []

    @abstractmethod
    def handshake(self) -> dict[str, Any]:
        """msgpack-able info a sender needs to reach this pool (given to KVSender.connect)."""

    def expect(self, rid: str, dst_pages: list[int]) -> None:
        """Register rid's reserved pages; call before the PrefillTask is sent."""
        if rid in self._expected:
            raise ValueError(f"request {rid}: already expects a KV transfer")
        check_pages(dst_pages, self.num_pages, f"request {rid}: dst_pages")
        self._expected[rid] = set(dst_pages)
        if not dst_pages:
            self._finish(rid)

    def poll(self) -> list[str]:
        """Non-blocking: the rids whose KV bytes have fully landed since the last poll."""
        self._drain()
        arrived, self._arrived = self._arrived, []
        return arrived

    def take_failures(self) -> list[TransferFailure]:
        """Transfers this side saw fail since the last call (bad layout, broken peer): the worker
        aborts them as it would a KV timeout. Call after poll()."""
        failures, self._failures = self._failures, []
        return failures

    def cancel(self, rid: str) -> None:
        """Forget rid: bytes for it that arrive later are dropped, never written."""
        self._expected.pop(rid, None)
        self._arrived = [r for r in self._arrived if r != rid]
        self._head_masks.pop(rid, None)

    def is_expecting(self, rid: str) -> bool:
        return rid in self._expected

    def close(self) -> None:
        self._expected.clear()

    @abstractmethod
    def _drain(self) -> None:
        """Take in whatever the backend has received (tcp, nccl); cuda_ipc has nothing to do."""

    def _land(self, rid: str, dst_pages: list[int], data: torch.Tensor) -> None:
        """Write data [L, 2, n, ...] into dst_pages if rid still expects exactly those pages."""
        remaining = self._expected.get(rid)
        if remaining is None:
            logger.info("request %s: dropping %d late KV pages (not expected)", rid, len(dst_pages))
            return
        pages = set(dst_pages)
        if not dst_pages or len(pages) != len(dst_pages) or not pages <= remaining:
            logger.warning(
                "request %s: dropping KV pages %s: not among its reserved pages still to land",
                rid,
                dst_pages[:8],
            )
            return
        scatter_pages(self.buffer, dst_pages, data)
        remaining.difference_update(dst_pages)
        if not remaining:
            self._finish(rid)

    def _land_heads(
        self, rid: str, dst_pages: list[int], head_start: int, num_heads: int, data: torch.Tensor
    ) -> None:
        """Write data [L, 2, n, ps, num_heads, D] into heads head_start.. of dst_pages of this
        rank's pool; a page counts as landed once all its heads have (from one or more chunks)."""
        remaining = self._expected.get(rid)
        if remaining is None:
            logger.info("request %s: dropping %d late KV pages (not expected)", rid, len(dst_pages))
            return
        pages = set(dst_pages)
        if not dst_pages or len(pages) != len(dst_pages) or not pages <= remaining:
            logger.warning(
                "request %s: dropping KV pages %s: not among its reserved pages still to land",
                rid,
                dst_pages[:8],
            )
            return
        bits = ((1 << num_heads) - 1) << head_start
        masks = self._head_masks.setdefault(rid, {})
        if any(masks.get(p, 0) & bits for p in dst_pages):
            logger.warning("request %s: dropping KV heads that already landed", rid)
            return
        if num_heads == self.num_local_heads:
            scatter_pages(self.local, dst_pages, data)
        else:
            index = page_index(dst_pages, self.local.device)
            heads = slice(head_start, head_start + num_heads)
            self.local[:, :, index, :, heads] = data.to(self.local.device)
        self.bytes_received += data.numel() * data.element_size()
        full = (1 << self.num_local_heads) - 1
        for p in dst_pages:
            mask = masks.get(p, 0) | bits
            if mask == full:
                masks.pop(p, None)
                remaining.discard(p)
            else:
                masks[p] = mask
        if not remaining:
            self._head_masks.pop(rid, None)
            self._finish(rid)

    def _finish(self, rid: str) -> None:
        self._expected.pop(rid, None)
        self._arrived.append(rid)

    def _fail(self, rid: str, error: str) -> None:
        """Report rid failed (if still expected) and stop accepting bytes for it."""
        logger.warning("request %s: KV transfer failed: %s", rid, error)
        self._head_masks.pop(rid, None)
        if self._expected.pop(rid, None) is not None:
            self._failures.append(TransferFailure(rid, error))


# ---------------------------------------------------------------------------- the sender


class Transfer(NamedTuple):
    """One request's pages to push: src_pages of the prefill pool into dst_pages of decode
    `decode_idx`'s pool (reserved there), in the same order."""

    rid: str
    decode_idx: int
    src_pages: list[int]
    dst_pages: list[int]


class PagePush(NamedTuple):
    """A Transfer whose page ids passed the checks, ready for the backend."""

    transfer: Transfer
    src_ids: array.array  # [n] int32 ('i'): the src page ids, checked
    dst_ids: array.array  # [n] int32 ('i'): the dst page ids, checked


Outcome = TransferResult | Exception  # one transfer's: its result, or what failed it alone


class KVSender(ABC):
    """In the prefill worker; owns the source pool. One sender reaches every decode worker.

    faults: the worker's FaultInjector when the topology's fault_injection is on (tests)."""

    faults: FaultInjector = NO_FAULTS

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, peers_info: list[dict[str, Any] | None] | tuple = ()
    ) -> None:
        self.buffer = kv_buffer_of(pool)  # [L, 2, num_pages, page_size, Hkv, D] (see KVReceiver)
        self.page_nbytes = self.buffer[:, :, 0].numel() * self.buffer.element_size()
        self.stats = TransferStats()
        self._handshakes: dict[int, dict[str, Any]] = {
            i: h for i, h in enumerate(peers_info) if h is not None
        }
        self._connected: dict[int, dict[str, Any]] = {}

    def connect(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        """Open the way to decode worker `decode_idx` (its receiver's handshake()). Idempotent; a
        changed handshake (the decode worker was restarted: a new pool, store or address) opens
        the way anew, so pages never go to the dead process's pool."""
        if self._connected.get(decode_idx) == handshake:
            return
        backend = handshake.get("backend")
        if backend != self.backend_name:
            raise ValueError(
                f"decode {decode_idx}: handshake is for backend {backend!r}, "
                f"expected {self.backend_name!r}"
            )
        check_same_layout(self.buffer, handshake, f"decode {decode_idx}")
        self._open(decode_idx, handshake)
        self._connected[decode_idx] = handshake

    def send(
        self,
        rid: str,
        decode_idx: int,
        src_pages: list[int],
        dst_pages: list[int],
        timeout_s: float,
    ) -> TransferResult:
        """Push src_pages of this pool into dst_pages of decode `decode_idx`'s pool.

        Returns when the source pages may be reused and the destination will hold the data
        (cuda_ipc: written; tcp: bytes queued in zmq; nccl: send completed). Raises
        KVTransferError on a failure or timeout, ValueError on bad page ids."""
        outcome = self.send_many([Transfer(rid, decode_idx, src_pages, dst_pages)], timeout_s)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def send_many(self, transfers: list[Transfer], timeout_s: float) -> list[Outcome]:
        """send() for several requests at once, e.g. every prompt one prefill step finished:
        cuda_ipc copies them all with one kernel per decode worker and waits once, so small
        transfers share the fixed cost. Transfers to one decode worker must not share dst pages
        (two requests never do). Returns each transfer's TransferResult (seconds: the whole
        call's) or the exception that failed it alone (as send() would raise it)."""
        start = time.perf_counter()
        deadline = start + timeout_s
        outcomes: list[Any] = [None] * len(transfers)  # bytes moved or an exception, per transfer
        refused: set[int] = set()  # refused before anything moved: not counted as failures
        pushes: dict[int, PagePush] = {}  # transfer index -> its checked pages, still to move
        for i, transfer in enumerate(transfers):
            try:
                push = self._check(transfer)
            except (ValueError, KVTransferError) as e:
                outcomes[i] = e
                refused.add(i)
                continue
            fault = self.faults.kv_push()
            if fault.delay_s:  # counts against the deadline
                time.sleep(fault.delay_s)
            if fault.fail_before:
                outcomes[i] = InjectedFault("injected KV transfer failure before the push")
            else:
                pushes[i] = push
                if fault.fail_after:  # the bytes move, then the push reports a failure
                    outcomes[i] = InjectedFault("injected KV transfer failure after the push")
        moved = self._send_pushes(list(pushes.values()), deadline) if pushes else []
        seconds = time.perf_counter() - start
        for i, num_bytes in zip(pushes, moved, strict=True):
            if outcomes[i] is None:
                outcomes[i] = num_bytes
        return self._account(transfers, outcomes, refused, seconds)

    def _check(self, t: Transfer) -> PagePush:
        """t's page ids as checked arrays; ValueError on bad ids, KVTransferError when its
        decode worker cannot be reached. Refused before any launch (see check_pages)."""
        if t.decode_idx not in self._connected:
            if t.decode_idx not in self._handshakes:
                raise KVTransferError(f"request {t.rid}: no handshake for decode {t.decode_idx}")
            self.connect(t.decode_idx, self._handshakes[t.decode_idx])
        if len(t.src_pages) != len(t.dst_pages):
            raise ValueError(
                f"request {t.rid}: {len(t.src_pages)} src pages but {len(t.dst_pages)} dst pages"
            )
        peer_pages = self._connected[t.decode_idx]["num_pages"]
        src_ids = page_array(t.src_pages, self.buffer.shape[2], f"request {t.rid}: src_pages")
        dst_ids = page_array(t.dst_pages, peer_pages, f"request {t.rid}: dst_pages")
        return PagePush(t, src_ids, dst_ids)

    def _account(
        self, transfers: list[Transfer], outcomes: list[Any], refused: set[int], seconds: float
    ) -> list[Outcome]:
        """Turn each outcome (bytes moved, or an exception) into a TransferResult or a
        KVTransferError naming the request, and add them to the stats."""
        results: list[Outcome] = []
        num_ok = 0
        for i, (t, outcome) in enumerate(zip(transfers, outcomes, strict=True)):
            if isinstance(outcome, int):
                self.stats.bytes_sent += outcome
                num_ok += 1
                results.append(TransferResult(outcome, seconds))
                continue
            if i in refused:
                results.append(outcome)
                continue
            self.stats.num_failures += 1
            if not isinstance(outcome, KVTransferError):
                error = KVTransferError(
                    f"request {t.rid}: KV transfer to decode {t.decode_idx} failed: {outcome}"
                )
                error.__cause__ = outcome
                outcome = error
            results.append(outcome)
        if num_ok:
            self.stats.seconds += seconds
            self.stats.num_transfers += num_ok
        return results

    def _send_pushes(self, pushes: list[PagePush], deadline: float) -> list[int | Exception]:
        """Move every push's pages; per push, its payload bytes or the exception that failed it.
        Backends that can move several requests' pages together override this."""
        moved: list[int | Exception] = []
        for push in pushes:
            t = push.transfer
            try:
                moved.append(
                    self._send(t.rid, t.decode_idx, list(t.src_pages), list(t.dst_pages), deadline)
                    if push.src_ids
                    else 0
                )
            except Exception as e:  # this push alone fails; the caller turns it into its error
                moved.append(e)
        return moved

    @property
    @abstractmethod
    def backend_name(self) -> str: ...

    @abstractmethod
    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None: ...

    @abstractmethod
    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        """Move the pages (validated, non-empty); return payload bytes; raise on failure.
        deadline: time.perf_counter() value by which it must be done."""

    def _gather(self, pages: list[int]) -> torch.Tensor:
        """The pages of this pool as one contiguous [L, 2, n, page_size, Hkv, D] tensor."""
        return gather_pages(self.buffer, pages)

    def close(self) -> None:
        self._connected.clear()
