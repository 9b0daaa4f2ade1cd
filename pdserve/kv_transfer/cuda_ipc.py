"""KV transfer through CUDA IPC: the prefill process opens the decode pool and copies pages into it.

Same node only. The handshake is the pool storage's eight `_share_cuda_()` fields (ints, bytes, a
bool: msgpack, no pickle) plus the tensor's geometry; the sender opens it once and keeps it open for
its lifetime. The decode process must keep its pool alive while any prefill process is up. Works
when both processes share one GPU, or when the decode GPU is also visible to the prefill process.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import logging
import os
import time
from typing import Any

import torch

from pdserve.kv_transfer.base import (
    HasKVBuffer,
    KVReceiver,
    KVSender,
    PagePush,
    check_pages,
    dtype_from_name,
    gather_pages,
    layout_of,
    scatter_pages,
)

logger = logging.getLogger(__name__)


def device_uuid(index: int) -> str:
    """A GPU's identity that survives CUDA_VISIBLE_DEVICES renumbering ('' if torch lacks it)."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else ""


def _plain(value: Any) -> int | bool | bytes | None:
    """A `_share_cuda_` field as a msgpack-able value (bytes stay bytes)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"unexpected CUDA IPC handle field of type {type(value).__name__}")


def _local_device(handshake: dict[str, Any]) -> int:
    """This process's index of the decode pool's GPU (processes may number GPUs differently)."""
    uuid = handshake.get("device_uuid", "")
    if uuid:
        for index in range(torch.cuda.device_count()):
            if device_uuid(index) == uuid:
                return index
        raise ValueError(
            f"cuda_ipc: the decode pool's GPU {uuid} is not visible in this process "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); cuda_ipc needs "
            "the same GPU or the decode GPU visible here: use kv_transfer backend 'nccl'"
        )
    return int(handshake["ipc_fields"][0])


def open_shared_pool(handshake: dict[str, Any]) -> torch.Tensor:
    """The decode pool [L, 2, num_pages, page_size, Hkv, D] opened in this process."""
    torch.cuda.init()
    fields = list(handshake["ipc_fields"])
    fields[0] = _local_device(handshake)
    storage = torch.UntypedStorage._new_shared_cuda(*fields)
    dtype = dtype_from_name(handshake["dtype"])
    empty = torch.empty(0, dtype=dtype, device=torch.device("cuda", fields[0]))
    return empty.set_(storage, handshake["storage_offset"], handshake["shape"], handshake["stride"])


class CudaIpcReceiver(KVReceiver):
    """Nothing arrives here: the sender writes the pool directly, so poll() reports nothing and the
    worker relies on KVReady alone. For the same reason a cancelled request's pages must stay
    reserved until the prefill's KVReady (see the ownership table in base.py)."""

    needs_arrival = False
    frees_on_cancel = False

    def __init__(self, pool: torch.Tensor | HasKVBuffer) -> None:
        super().__init__(pool)
        if not self.buffer.is_cuda:
            raise ValueError(f"cuda_ipc needs a CUDA KV pool, got device {self.buffer.device}")
        self._handshake: dict[str, Any] | None = None

    def handshake(self) -> dict[str, Any]:
        if self._handshake is None:  # share once: each call registers new IPC ref counters
            fields = self.buffer.untyped_storage()._share_cuda_()
            index = self.buffer.device.index
            self._handshake = {
                "backend": "cuda_ipc",
                "ipc_fields": [_plain(f) for f in fields],
                "shape": list(self.buffer.shape),
                "stride": list(self.buffer.stride()),
                "storage_offset": self.buffer.storage_offset(),
                "device_uuid": device_uuid(index),
                "pid": os.getpid(),
                **layout_of(self.buffer),
            }
        return self._handshake

    def expect(self, rid: str, dst_pages: list[int]) -> None:
        """Only checks the page ids: nothing will arrive to be matched against them."""
        check_pages(dst_pages, self.num_pages, f"request {rid}: dst_pages")

    def poll(self) -> list[str]:
        return []

    def _drain(self) -> None:
        return None


class _PageIdUpload:
    """Page ids on their way to the copy kernel: packed into one pinned host buffer and sent to
    the device with one host-to-device copy per batch of transfers. Both buffers are reused: the
    sender waits for each batch's copy (which follows this upload on one stream) before it packs
    the next batch, so the pinned bytes are never overwritten while a copy may still read them."""

    def __init__(self, device: torch.device, capacity: int = 8192) -> None:
        self.device = device
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.capacity = capacity
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=True)  # [cap] int32
        self._dev = torch.empty(capacity, dtype=torch.int32, device=self.device)  # [cap] int32
        self._host_ptr = self._host.data_ptr()
        self._slices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # total -> (dev, host)

    def _slice(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `total` ids of both buffers (views kept: making them costs microseconds)."""
        views = self._slices.get(total)
        if views is None:
            views = (self._dev[:total], self._host[:total])
            if len(self._slices) < 1024:
                self._slices[total] = views
        return views

    def upload(self, parts: list[array.array]) -> torch.Tensor:
        """The int32 arrays of `parts`, one after another, as a device tensor [>= total] int32;
        the copy is enqueued on the current stream, ahead of the kernels that read it."""
        total = sum(len(part) for part in parts)
        if total > self.capacity:
            self._grow(max(total, 2 * self.capacity))
        offset = self._host_ptr
        for part in parts:
            address, length = part.buffer_info()
            ctypes.memmove(offset, address, length * 4)
            offset += length * 4
        dev, host = self._slice(total)
        dev.copy_(host, non_blocking=True)
        return self._dev


class CudaIpcSender(KVSender):
    """Writes pages straight into the decode pool opened through its IPC handle (opened once per
    handshake, kept open). On one GPU a batch of transfers costs one host-to-device copy of the
    page ids, one copy kernel per decode pool (all layers, K and V) and one wait at the end, all
    on the current stream: it follows the prefill that wrote the pages, and whatever reuses the
    source pages later follows it."""

    backend_name = "cuda_ipc"

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, peers_info: list[dict[str, Any] | None] | tuple = ()
    ) -> None:
        super().__init__(pool, peers_info)
        if not self.buffer.is_cuda:
            raise ValueError(f"cuda_ipc needs a CUDA KV pool, got device {self.buffer.device}")
        self.device = self.buffer.device
        self._pools: dict[int, torch.Tensor] = {}  # decode idx -> its opened pool, kept open
        self._copies: dict[int, Any] = {}  # decode idx -> PoolCopy into its pool (same GPU)
        self._ids = _PageIdUpload(self.device)
        self._done = torch.cuda.Event()  # recorded after a batch's kernels; waited on once
        self._stream = torch.cuda.Stream(device=self.device)  # decode pool on another GPU only
        self._stream_raw: int | None = None  # the current stream's handle, and its object:
        self._stream_obj: torch.cuda.Stream | None = None

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        if handshake.get("pid") == os.getpid():
            raise ValueError(
                "cuda_ipc: sender and receiver are in one process; CUDA IPC opens "
                "memory of another process only"
            )
        pool = open_shared_pool(handshake)
        self._pools[decode_idx] = pool
        self._copies.pop(decode_idx, None)
        if pool.device == self.device:
            from pdserve.kernels.triton_page_copy import PoolCopy  # triton: only when used

            self._copies[decode_idx] = PoolCopy(self.buffer, pool)
        logger.info(
            "cuda_ipc: opened decode %d's KV pool %s on %s",
            decode_idx,
            list(pool.shape),
            pool.device,
        )

    def _send_pushes(self, pushes: list[PagePush], deadline: float) -> list[int | Exception]:
        moved: list[int | Exception] = [0] * len(pushes)
        by_pool: dict[int, list[int]] = {}  # decode idx -> its pushes (indexes) on this GPU
        others: list[int] = []  # pushes to a decode pool on another GPU
        for i, push in enumerate(pushes):
            if not push.src_ids:
                continue
            if push.transfer.decode_idx in self._copies:
                by_pool.setdefault(push.transfer.decode_idx, []).append(i)
            else:
                others.append(i)
        if others:
            results = super()._send_pushes([pushes[i] for i in others], deadline)
            for i, result in zip(others, results, strict=True):
                moved[i] = result
        if by_pool:
            try:
                self._copy_on_device(pushes, by_pool)
            except Exception as e:  # a launch failed: every push of the batch failed with it
                for idxs in by_pool.values():
                    for i in idxs:
                        moved[i] = e
            else:
                for idxs in by_pool.values():
                    for i in idxs:
                        moved[i] = len(pushes[i].src_ids) * self.page_nbytes
        if time.perf_counter() > deadline:  # written all the same; report it as slow, not failed
            logger.warning(
                "requests %s: cuda_ipc copy finished past its deadline",
                [p.transfer.rid for p in pushes][:8],
            )
        return moved

    def _copy_on_device(self, pushes: list[PagePush], by_pool: dict[int, list[int]]) -> None:
        """Every push of `by_pool`: one kernel per decode pool, one wait for all. A pool's pages
        travel as kernel arguments when they are few, else in one upload of page ids shared by
        all pools (src ids at [offset, +n), its dst ids right after)."""
        parts: list[array.array] = []  # the upload: src ids, dst ids of each pool in turn
        launches: list[tuple[Any, int, int]] = []  # (copy, ids offset, num pages)
        few: list[tuple[Any, list[int], list[int]]] = []  # (copy, src ids, dst ids)
        offset = 0
        for decode_idx, idxs in by_pool.items():
            copy = self._copies[decode_idx]
            src = [pushes[i].src_ids for i in idxs]
            dst = [pushes[i].dst_ids for i in idxs]
            num = sum(len(ids) for ids in src)
            if num <= copy.few_pages:
                few.append((copy, [p for ids in src for p in ids], [p for ids in dst for p in ids]))
                continue
            parts += src + dst
            launches.append((copy, offset, num))
            offset += 2 * num
        here = torch.cuda.current_device() == self.device.index  # as in a worker: skip the guard
        with contextlib.nullcontext() if here else torch.cuda.device(self.device):
            stream = self._current_stream()
            try:
                for copy, src_ids, dst_ids in few:
                    copy.copy_few(src_ids, dst_ids)
                if launches:
                    ids = self._ids.upload(parts)
                    for copy, ids_offset, num in launches:
                        copy(ids, ids_offset, num)
            finally:  # also after a failed launch: the pinned ids are reused by the next batch
                self._done.record(stream)
                self._done.synchronize()

    def _current_stream(self) -> torch.cuda.Stream:
        """torch.cuda.current_stream(), with its Python object reused while the stream stays
        the same (building one costs microseconds, on a path that should cost few)."""
        raw = torch._C._cuda_getCurrentRawStream(self.device.index)
        if raw != self._stream_raw:
            self._stream_obj = torch.cuda.current_stream(self.device)
            self._stream_raw = raw
        return self._stream_obj

    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        """The decode pool is on another GPU visible here: gather, peer copy, scatter."""
        dst = self._pools[decode_idx]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            data = gather_pages(self.buffer, src_pages)  # [L, 2, n, ps, Hkv, D]
        self._stream.synchronize()
        with torch.cuda.device(dst.device):
            scatter_pages(dst, dst_pages, data)
            torch.cuda.synchronize(dst.device)
        return data.numel() * data.element_size()

    def close(self) -> None:
        super().close()
        self._pools.clear()
        self._copies.clear()
