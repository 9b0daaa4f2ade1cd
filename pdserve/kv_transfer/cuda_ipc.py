"""KV transfer through CUDA IPC: the prefill process opens the decode pool and copies pages into it.

Same node only. The handshake is the pool storage's eight `_share_cuda_()` fields (ints, bytes, a
bool: msgpack, no pickle) plus the tensor's geometry; the sender opens it once and keeps it open for
its lifetime. The decode process must keep its pool alive while any prefill process is up. Works
when both processes share one GPU, or when the decode GPU is also visible to the prefill process.

Tensor-parallel workers (worker/parallel/kv_direct.py drives the ranks): every decode rank shares
its own pool, and each prefill rank opens those of the decode ranks it feeds and copies its run
of heads of each page into theirs (head_copy.py); ranks of equal degrees copy whole pages with
the one kernel tp 1 uses.
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
    dtype_from_name,
    layout_of,
)
from pdserve.kv_transfer.head_copy import (
    check_rank_pool,
    copy_heads,
    is_whole_pages,
    plan_head_copies,
)
from pdserve.kv_transfer.head_map import HeadRoute, rank_handshakes, routes_from
from pdserve.kv_transfer.page_copy import check_pages, gather_pages, scatter_pages

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
        super().__init__(pool)  # self.local: this rank's pool (the whole one at tp 1)
        if not self.local.is_cuda:
            raise ValueError(f"cuda_ipc needs a CUDA KV pool, got device {self.local.device}")
        self._handshake: dict[str, Any] | None = None

    def handshake(self) -> dict[str, Any]:
        """This rank's pool (its heads) to open; the layout is the whole pool's, every head."""
        if self._handshake is None:  # share once: each call registers new IPC ref counters
            fields = self.local.untyped_storage()._share_cuda_()
            index = self.local.device.index
            self._handshake = {
                "backend": "cuda_ipc",
                "ipc_fields": [_plain(f) for f in fields],
                "shape": list(self.local.shape),
                "stride": list(self.local.stride()),
                "storage_offset": self.local.storage_offset(),
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
    source pages later follows it.

    Tensor parallelism: each rank has its own sender over its share of the pool
    (head_map.RankKVShare). A decode worker's handshake lists each rank's pool (`ranks`); this
    rank opens those of the decode ranks it feeds (head_map.routes_from). A route of whole pages
    (equal degrees: rank r feeds rank r its every head) takes the one-kernel path above; other
    routes copy their run of heads into the destination rank's head slice (head_copy.py), and a
    batch waits once for them all."""

    backend_name = "cuda_ipc"
    needs_cuda_pool = True  # False only in CPU tests, where CPU tensors stand in for the pools

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, peers_info: list[dict[str, Any] | None] | tuple = ()
    ) -> None:
        super().__init__(pool, peers_info)
        self.local: torch.Tensor = getattr(pool, "local", self.buffer)  # this rank's heads
        self.tp_rank: int = getattr(pool, "tp_rank", 0)
        self.tp_size: int = getattr(pool, "tp_size", 1)
        if not self.local.is_cuda and self.needs_cuda_pool:
            raise ValueError(f"cuda_ipc needs a CUDA KV pool, got device {self.local.device}")
        self.device = self.local.device
        self.local_page_nbytes = self.local[:, :, 0].numel() * self.local.element_size()
        self._pools: dict[int, torch.Tensor] = {}  # decode idx -> its opened pool, kept open
        self._copies: dict[int, Any] = {}  # decode idx -> PoolCopy into its pool (same GPU)
        # decode idx -> (a decode rank's opened pool, the heads this rank copies into it), for
        # decode workers fed by head-sliced copies (tensor-parallel degrees that differ)
        self._routes: dict[int, list[tuple[torch.Tensor, HeadRoute]]] = {}
        self._stream_raw: int | None = None  # the current stream's handle, and its object:
        self._stream_obj: torch.cuda.Stream | None = None
        if self.local.is_cuda:
            self._ids = _PageIdUpload(self.device)
            self._done = torch.cuda.Event()  # recorded after a batch's kernels; waited on once
            self._stream = torch.cuda.Stream(device=self.device)  # a pool on another GPU only

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        ranks = rank_handshakes(handshake)
        num_kv_heads = self.buffer.shape[4]  # the whole pool's, as the handshake's layout
        routes = routes_from(self.tp_rank, self.tp_size, len(ranks), num_kv_heads)
        pools = {r.decode_rank: self._open_rank(ranks[r.decode_rank]) for r in routes}
        for r in routes:
            check_rank_pool(
                self.local, pools[r.decode_rank], r.decode_rank, len(ranks), num_kv_heads
            )
        for opened in (self._pools, self._copies, self._routes):
            opened.pop(decode_idx, None)
        first = pools[routes[0].decode_rank] if routes else None
        # whole pages into a CUDA pool: the page copy path (CPU stand-ins in tests: head copies)
        if (
            len(routes) == 1
            and first.is_cuda
            and is_whole_pages(routes[0], self.local.shape[4], first.shape[4])
        ):
            self._pools[decode_idx] = first
            if first.device == self.device:
                from pdserve.kernels.triton_page_copy import PoolCopy  # triton: only when used

                self._copies[decode_idx] = PoolCopy(self.local, first)
        else:
            self._routes[decode_idx] = [(pools[r.decode_rank], r) for r in routes]
        logger.info(
            "cuda_ipc: opened decode %d's KV pool%s %s",
            decode_idx,
            "" if len(ranks) == 1 else f" (ranks {sorted(pools)} of {len(ranks)})",
            [(list(p.shape), str(p.device)) for p in pools.values()],
        )

    def _open_rank(self, handshake: dict[str, Any]) -> torch.Tensor:
        """One decode rank's pool [L, 2, num_pages, page_size, h, D], opened in this process."""
        if handshake.get("pid") == os.getpid():
            raise ValueError(
                "cuda_ipc: sender and receiver are in one process; CUDA IPC opens "
                "memory of another process only"
            )
        return open_shared_pool(handshake)

    def _send_pushes(self, pushes: list[PagePush], deadline: float) -> list[int | Exception]:
        moved: list[int | Exception] = [0] * len(pushes)
        by_pool: dict[int, list[int]] = {}  # decode idx -> its pushes (indexes) on this GPU
        by_heads: dict[int, list[int]] = {}  # decode idx -> its pushes, head-sliced copies
        others: list[int] = []  # pushes to a decode pool on another GPU
        for i, push in enumerate(pushes):
            if not push.src_ids:
                continue
            if push.transfer.decode_idx in self._copies:
                by_pool.setdefault(push.transfer.decode_idx, []).append(i)
            elif push.transfer.decode_idx in self._routes:
                by_heads.setdefault(push.transfer.decode_idx, []).append(i)
            else:
                others.append(i)
        if others:
            results = super()._send_pushes([pushes[i] for i in others], deadline)
            for i, result in zip(others, results, strict=True):
                moved[i] = result
        for decode_idx, idxs in by_heads.items():
            self._send_heads(decode_idx, [pushes[i] for i in idxs], idxs, moved)
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
                        moved[i] = len(pushes[i].src_ids) * self.local_page_nbytes
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

    def _send_heads(
        self,
        decode_idx: int,
        pushes: list[PagePush],
        idxs: list[int],
        moved: list[int | Exception],
    ) -> None:
        """The pushes to one decode worker fed by head-sliced copies: each route's run of heads of
        every page, into its decode rank's pool; waited on (even after a failed launch: the
        pages must not be written once the sender has let go). moved[idxs[k]]: push k's bytes,
        or the exception that failed them all."""
        routes = self._routes[decode_idx]
        src = [p for push in pushes for p in push.src_ids]
        dst = [p for push in pushes for p in push.dst_ids]
        pools = {route.decode_rank: pool for pool, route in routes}
        try:
            with self._on_device():
                try:
                    copy_heads(
                        self.local, pools, plan_head_copies([r for _, r in routes], src, dst)
                    )
                finally:
                    self._wait(list(pools.values()))
        except Exception as e:  # a launch failed: every push to this decode worker failed
            for i in idxs:
                moved[i] = e
            return
        head_nbytes = self.local_page_nbytes // self.local.shape[4]  # one head of one page
        per_page = sum(route.num_heads for _, route in routes) * head_nbytes
        for i, push in zip(idxs, pushes, strict=True):
            moved[i] = len(push.src_ids) * per_page

    def _on_device(self) -> contextlib.AbstractContextManager:
        """This pool's GPU as the current device (a worker's already is: no guard then)."""
        here = not self.local.is_cuda or torch.cuda.current_device() == self.device.index
        return contextlib.nullcontext() if here else torch.cuda.device(self.device)

    def _wait(self, pools: list[torch.Tensor]) -> None:
        """Until the copies enqueued on the current streams are done (CPU tensors: at once)."""
        if not self.local.is_cuda:
            return
        self._done.record(self._current_stream())
        self._done.synchronize()
        for device in {pool.device for pool in pools if pool.device != self.device}:
            torch.cuda.synchronize(device)

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
            data = gather_pages(self.local, src_pages)  # [L, 2, n, ps, Hkv, D]
        self._stream.synchronize()
        with torch.cuda.device(dst.device):
            scatter_pages(dst, dst_pages, data)
            torch.cuda.synchronize(dst.device)
        return data.numel() * data.element_size()

    def close(self) -> None:
        super().close()
        self._pools.clear()
        self._copies.clear()
        self._routes.clear()
