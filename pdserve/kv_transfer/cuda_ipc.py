"""KV transfer through CUDA IPC: the prefill process opens the decode pool and copies pages into it.

Same node only. The handshake is the pool storage's eight `_share_cuda_()` fields (ints, bytes, a
bool: msgpack, no pickle) plus the tensor's geometry; the sender opens it once and keeps it open for
its lifetime. The decode process must keep its pool alive while any prefill process is up. Works
when both processes share one GPU, or when the decode GPU is also visible to the prefill process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from pdserve.kv_transfer.base import (
    HasKVBuffer,
    KVReceiver,
    KVSender,
    check_pages,
    copy_pages,
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


class CudaIpcSender(KVSender):
    backend_name = "cuda_ipc"

    def __init__(
        self, pool: torch.Tensor | HasKVBuffer, peers_info: list[dict[str, Any] | None] | tuple = ()
    ) -> None:
        super().__init__(pool, peers_info)
        if not self.buffer.is_cuda:
            raise ValueError(f"cuda_ipc needs a CUDA KV pool, got device {self.buffer.device}")
        self._stream = torch.cuda.Stream(device=self.buffer.device)
        self._pools: dict[int, torch.Tensor] = {}  # decode idx -> its opened pool, kept open

    def _open(self, decode_idx: int, handshake: dict[str, Any]) -> None:
        if handshake.get("pid") == os.getpid():
            raise ValueError(
                "cuda_ipc: sender and receiver are in one process; CUDA IPC opens "
                "memory of another process only"
            )
        self._pools[decode_idx] = open_shared_pool(handshake)
        logger.info(
            "cuda_ipc: opened decode %d's KV pool %s on %s",
            decode_idx,
            list(self._pools[decode_idx].shape),
            self._pools[decode_idx].device,
        )

    def _send(
        self, rid: str, decode_idx: int, src_pages: list[int], dst_pages: list[int], deadline: float
    ) -> int:
        dst = self._pools[decode_idx]
        # The pages were written on the compute stream: the copy stream starts after it.
        self._stream.wait_stream(torch.cuda.current_stream(self.buffer.device))
        if dst.device == self.buffer.device:  # one pass, pool to pool
            with torch.cuda.stream(self._stream):
                copy_pages(self.buffer, src_pages, dst, dst_pages)
            self._stream.synchronize()
            page_bytes = self.buffer[:, :, 0].numel() * self.buffer.element_size()
            return page_bytes * len(src_pages)
        with torch.cuda.stream(self._stream):
            data = gather_pages(self.buffer, src_pages)  # [L, 2, n, ps, Hkv, D]
        self._stream.synchronize()
        if dst.device != self.buffer.device:  # decode GPU visible here: peer copy, then scatter
            with torch.cuda.device(dst.device):
                scatter_pages(dst, dst_pages, data)
                torch.cuda.synchronize(dst.device)
        if time.perf_counter() > deadline:  # written all the same; report it as slow, not failed
            logger.warning("request %s: cuda_ipc copy finished past its deadline", rid)
        return data.numel() * data.element_size()

    def close(self) -> None:
        super().close()
        self._pools.clear()
