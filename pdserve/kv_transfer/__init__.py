"""Moving a prompt's KV pages from a prefill worker's pool into a decode worker's pool.

One interface (`base.KVReceiver` in the decode worker, `base.KVSender` in the prefill worker) and
three backends: `nccl` (torch.distributed P2P; gloo on CPU pools), `cuda_ipc` (the decode pool opened
in the prefill process), `tcp` (staged through host memory over ZeroMQ). Backends import lazily, so
choosing `tcp` never loads CUDA or NCCL code.
"""

from __future__ import annotations

from typing import Any

import torch

from pdserve.kv_transfer.base import (
    BACKENDS,
    Backend,
    HasKVBuffer,
    KVReceiver,
    KVSender,
    KVTransferError,
    Transfer,
    TransferFailure,
    TransferResult,
    TransferStats,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "Transfer",
    "TransferFailure",
    "TransferResult",
    "TransferStats",
    "make_receiver",
    "make_sender",
    "resolve_backend",
]


def make_receiver(
    backend: str, pool: torch.Tensor | HasKVBuffer, address: str | None = None, **options: Any
) -> KVReceiver:
    """The decode worker's receiver for `pool` (a KVPool or its buffer).

    address: where the tcp/nccl receiver binds its socket (ipc:// or tcp://host:port; a fresh
    ipc:// one if None). options: host= (advertised instead of a wildcard bind address; nccl: the
    TCPStore's host), nccl: store_port= (0 picks a free one), timeout_s= (the pair groups' timeout).
    """
    if backend == "tcp":
        from pdserve.kv_transfer.tcp import TcpReceiver

        return TcpReceiver(pool, address, **options)
    if backend == "cuda_ipc":
        from pdserve.kv_transfer.cuda_ipc import CudaIpcReceiver

        if address is not None or options:
            raise ValueError("cuda_ipc receivers take no address or options")
        return CudaIpcReceiver(pool)
    if backend == "nccl":
        from pdserve.kv_transfer.nccl import NcclReceiver

        return NcclReceiver(pool, address, **options)
    raise ValueError(f"kv_transfer backend {backend!r} is invalid: expected one of {BACKENDS}")


def make_sender(
    backend: str,
    pool: torch.Tensor | HasKVBuffer,
    peers_info: list[dict[str, Any] | None] | tuple = (),
    **options: Any,
) -> KVSender:
    """The prefill worker's sender for `pool`. peers_info[i]: decode worker i's receiver
    handshake (or None); each is connected on first use, or earlier by `connect(i, handshake)`.
    options: tcp: chunk_bytes=; nccl: timeout_s= (the pair groups' timeout)."""
    if backend == "tcp":
        from pdserve.kv_transfer.tcp import TcpSender

        return TcpSender(pool, peers_info, **options)
    if backend == "cuda_ipc":
        from pdserve.kv_transfer.cuda_ipc import CudaIpcSender

        return CudaIpcSender(pool, peers_info, **options)
    if backend == "nccl":
        from pdserve.kv_transfer.nccl import NcclSender

        return NcclSender(pool, peers_info, **options)
    raise ValueError(f"kv_transfer backend {backend!r} is invalid: expected one of {BACKENDS}")


def resolve_backend(
    backend: str,
    prefill_device: str | torch.device,
    decode_device: str | torch.device,
    same_node: bool = True,
) -> Backend:
    """The backend for one (prefill, decode) pair; `auto` resolved, explicit choices checked.

    Devices are as the topology names them: "cpu" or "cuda:N" with N the node's physical GPU index.
    auto: tcp when either side is on CPU; nccl across nodes or between two GPUs of one node (each
    worker only sees its own GPUs, so CUDA IPC could not open the other's memory); cuda_ipc when
    both share one GPU (NCCL refuses two ranks on one device)."""
    prefill, decode = torch.device(prefill_device), torch.device(decode_device)
    on_cpu = prefill.type == "cpu" or decode.type == "cpu"
    shared_gpu = same_node and not on_cpu and prefill == decode
    if backend == "auto":
        return "tcp" if on_cpu else "cuda_ipc" if shared_gpu else "nccl"
    if backend not in BACKENDS:
        raise ValueError(
            f"kv_transfer backend {backend!r} is invalid: expected one of {('auto', *BACKENDS)}"
        )
    if backend == "cuda_ipc" and (on_cpu or not same_node):
        where = "a CPU pool" if on_cpu else "different nodes"
        raise ValueError(
            f"kv_transfer backend 'cuda_ipc' is invalid for {where}: expected "
            "'tcp', 'nccl' or 'auto'"
        )
    if backend == "nccl" and shared_gpu:
        raise ValueError(
            f"kv_transfer backend 'nccl' is invalid: prefill and decode share "
            f"{prefill} and NCCL refuses two ranks on one device: expected "
            "'cuda_ipc' or 'auto'"
        )
    if backend == "nccl" and prefill.type != decode.type:
        raise ValueError(
            f"kv_transfer backend 'nccl' is invalid between {prefill} and {decode}: "
            "both pools must be CUDA (NCCL) or both CPU (gloo)"
        )
    return backend  # type: ignore[return-value]
