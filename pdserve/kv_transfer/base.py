"""The KV transfer contract: a receiver in the decode worker, a sender in the prefill worker.

The decode worker reserves destination pages first and registers them (`expect`); the prefill worker
pushes its source pages into them (`send`) and then reports `KVReady` on the control sockets. KV bytes
never ride in control messages. Backends: `tcp.py`, `cuda_ipc.py`, `nccl.py`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

from pdserve.fault_injection import NO_FAULTS, FaultInjector, InjectedFault
from pdserve.kernels.page_copy_ref import copy_pages_ref, gather_pages_ref, scatter_pages_ref

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


# ---------------------------------------------------------------------------- layout and pages


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


def check_pages(pages: list[int], num_pages: int, what: str) -> None:
    """Page ids must be distinct ints in [0, num_pages): an index kernel given a bad id corrupts
    other pages or kills the CUDA context, so it is refused before any launch."""
    seen: set[int] = set()
    for p in pages:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_pages:
            raise ValueError(
                f"{what}: page id {p!r} is invalid: expected an int in [0, {num_pages})"
            )
        if p in seen:
            raise ValueError(f"{what}: page id {p} appears twice")
        seen.add(p)


def page_index(pages: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.long, device=device)  # [n] int64


def gather_pages(buffer: torch.Tensor, pages: list[int]) -> torch.Tensor:
    """buffer[:, :, pages] as one contiguous [L, 2, n, page_size, Hkv, D] tensor."""
    index = page_index(pages, buffer.device)
    if buffer.is_cuda:  # the Triton copy moves about 2x what index_select does (BENCHMARKS.md)
        from pdserve.kernels.triton_page_copy import gather_pages as gather_pages_triton

        return gather_pages_triton(buffer, index)
    return gather_pages_ref(buffer, index)


def copy_pages(
    src: torch.Tensor, src_pages: list[int], dst: torch.Tensor, dst_pages: list[int]
) -> None:
    """dst[:, :, dst_pages] = src[:, :, src_pages], both pools on one device, in one pass."""
    src_index = page_index(src_pages, src.device)
    dst_index = page_index(dst_pages, dst.device)
    if src.is_cuda:
        from pdserve.kernels.triton_page_copy import copy_pages as copy_pages_triton

        copy_pages_triton(src, src_index, dst, dst_index)
        return
    copy_pages_ref(src, src_index, dst, dst_index)


def scatter_pages(buffer: torch.Tensor, pages: list[int], data: torch.Tensor) -> None:
    """buffer[:, :, pages] = data  (data: [L, 2, n, page_size, Hkv, D], any device)."""
    data = data.to(buffer.device, non_blocking=False)
    index = page_index(pages, buffer.device)
    if buffer.is_cuda:
        from pdserve.kernels.triton_page_copy import scatter_pages as scatter_pages_triton

        scatter_pages_triton(buffer, index, data)
        return
    scatter_pages_ref(buffer, index, data)


# ---------------------------------------------------------------------------- the receiver


class KVReceiver(ABC):
    """In the decode worker; owns the destination pool.

    needs_arrival: the worker commits a request only after poll() reported it (besides KVReady).
    frees_on_cancel: after cancel(rid) the worker may free rid's pages at once (see the table).
    """

    needs_arrival: bool = True
    frees_on_cancel: bool = True

    def __init__(self, pool: torch.Tensor | HasKVBuffer) -> None:
        self.buffer = kv_buffer_of(pool)  # [L, 2, num_pages, page_size, Hkv, D]
        self.num_pages = self.buffer.shape[2]
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

    def _finish(self, rid: str) -> None:
        self._expected.pop(rid, None)
        self._arrived.append(rid)

    def _fail(self, rid: str, error: str) -> None:
        """Report rid failed (if still expected) and stop accepting bytes for it."""
        logger.warning("request %s: KV transfer failed: %s", rid, error)
        if self._expected.pop(rid, None) is not None:
            self._failures.append(TransferFailure(rid, error))


# ---------------------------------------------------------------------------- the sender


class KVSender(ABC):
    """In the prefill worker; owns the source pool. One sender reaches every decode worker.

    faults: the worker's FaultInjector when the topology's fault_injection is on (tests)."""

    faults: FaultInjector = NO_FAULTS

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, peers_info: list[dict[str, Any] | None] | tuple = ()
    ) -> None:
        self.buffer = kv_buffer_of(pool)  # [L, 2, num_pages, page_size, Hkv, D]
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
        if decode_idx not in self._connected:
            if decode_idx not in self._handshakes:
                raise KVTransferError(f"request {rid}: no handshake for decode {decode_idx}")
            self.connect(decode_idx, self._handshakes[decode_idx])
        peer_pages = self._connected[decode_idx]["num_pages"]
        if len(src_pages) != len(dst_pages):
            raise ValueError(
                f"request {rid}: {len(src_pages)} src pages but {len(dst_pages)} dst pages"
            )
        check_pages(src_pages, self.buffer.shape[2], f"request {rid}: src_pages")
        check_pages(dst_pages, peer_pages, f"request {rid}: dst_pages")
        start = time.perf_counter()
        try:
            num_bytes = self._push(
                rid, decode_idx, list(src_pages), list(dst_pages), start + timeout_s
            )
        except Exception as e:
            self.stats.num_failures += 1
            if isinstance(e, KVTransferError):
                raise
            raise KVTransferError(
                f"request {rid}: KV transfer to decode {decode_idx} failed: {e}"
            ) from e
        seconds = time.perf_counter() - start
        self.stats.bytes_sent += num_bytes
        self.stats.seconds += seconds
        self.stats.num_transfers += 1
        return TransferResult(num_bytes, seconds)

    def _push(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        """_send, with this push's injected faults (none unless fault_injection is on). A delay
        counts against the deadline; a failure after the bytes moved leaves them landed on
        decode, which must drop them when KVReady(ok=False) comes."""
        fault = self.faults.kv_push()
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.fail_before:
            raise InjectedFault("injected KV transfer failure before the push")
        num_bytes = self._send(rid, decode_idx, src_pages, dst_pages, deadline) if src_pages else 0
        if fault.fail_after:
            raise InjectedFault("injected KV transfer failure after the push")
        return num_bytes

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

    def close(self) -> None:
        self._connected.clear()
