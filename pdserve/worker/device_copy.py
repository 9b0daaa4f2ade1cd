"""Host-to-device copies that do not wait for the device.

A plain `tensor.to("cuda")` from pageable memory waits until the stream's queued work is done,
which would stall the overlapped loop (worker_core.py) on the step still running. Copying from
pinned memory with non_blocking=True does not wait. `tensor.pin_memory()` per copy costs ~0.5 ms
on the H200 host (eight of them a step made a constrained decode step 2.8 ms longer), so small
tensors are staged through one pinned ring buffer instead: each copy takes the next free bytes,
and bytes are reused only after the copy that read them has completed (a CUDA event per copy).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

RING_BYTES = 32 << 20  # pinned staging for the small per-step tensors (sampling batch, LoRA)
_ALIGN = 64


class PinnedRing:
    """A ring of host bytes (pinned on CUDA) that copies stage through. `make_event()` returns
    an object with record(), query() and synchronize() (a torch.cuda.Event on CUDA)."""

    def __init__(self, nbytes: int, pin: bool, make_event: Callable[[], Any]) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.head = 0
        self.make_event = make_event
        self.in_flight: deque[tuple[int, int, Any]] = deque()  # (start, end, event), oldest first

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.buf.numel() // 4

    def stage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """A staged copy of `tensor` (same dtype and shape, in the ring) and the function to call
        once the device copy reading it has been queued."""
        staged, queued = self.reserve(tensor.shape, tensor.dtype)
        staged.copy_(tensor)
        return staged, queued

    def reserve(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, Callable[[], None]]:
        """An uninitialised tensor in the ring, to fill in place, and the function to call once
        the device copy reading it has been queued."""
        nbytes = math.prod(shape) * dtype.itemsize
        start = self._reserve(nbytes)
        staged = self.buf[start : start + nbytes].view(dtype).view(shape)
        end = start + max(nbytes, 1)

        def queued() -> None:
            event = self.make_event()
            event.record()
            self.in_flight.append((start, end, event))

        return staged, queued

    def _reserve(self, nbytes: int) -> int:
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        if self.head + size > self.buf.numel():
            self.head = 0  # wrap; the tail's bytes go unused this lap
        start, end = self.head, self.head + size
        # Wait for the newest copy still reading [start, end), and for those before it (a lap's
        # leftovers at the ring's tail can come before it); then drop the ones already done.
        last = -1
        for i, (lo, hi, _) in enumerate(self.in_flight):
            if lo < end and hi > start:
                last = i
        for _ in range(last + 1):
            self.in_flight.popleft()[2].synchronize()
        while self.in_flight and self.in_flight[0][2].query():
            self.in_flight.popleft()
        self.head = end
        return start


_rings: dict[torch.device, PinnedRing] = {}


def _ring(device: torch.device) -> tuple[torch.device, PinnedRing]:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ring = _rings.get(device)
    if ring is None:
        ring = _rings[device] = PinnedRing(RING_BYTES, True, torch.cuda.Event)
    return device, ring


def host_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """A host tensor to fill, and the function `send(into=None)` that then returns it on
    `device` (queued, not waited for): copied into `into` when given (a device tensor of its
    shape and dtype), else a new tensor. On CUDA the host tensor lies in the pinned ring, so
    filling it is the only host copy; elsewhere it is a plain tensor."""
    device = torch.device(device)
    if device.type != "cuda":
        host = torch.empty(shape, dtype=dtype)

        def send_plain(into: torch.Tensor | None = None) -> torch.Tensor:
            return host.to(device) if into is None else into.copy_(host)

        return host, send_plain
    device, ring = _ring(device)
    if not ring.fits(math.prod(shape) * dtype.itemsize):
        host = torch.empty(shape, dtype=dtype, pin_memory=True)

        def send_pinned(into: torch.Tensor | None = None) -> torch.Tensor:
            if into is None:
                return host.to(device, non_blocking=True)
            return into.copy_(host, non_blocking=True)

        return host, send_pinned
    staged, queued = ring.reserve(shape, dtype)

    def send(into: torch.Tensor | None = None) -> torch.Tensor:
        with torch.cuda.device(device):
            if into is None:
                out = staged.to(device, non_blocking=True)
            else:
                out = into.copy_(staged, non_blocking=True)
            queued()
        return out

    return staged, send


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued behind the device's work, not waited for."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    device, ring = _ring(device)
    if not ring.fits(tensor.numel() * tensor.element_size()):
        return tensor.pin_memory().to(device, non_blocking=True)
    staged, queued = ring.stage(tensor)
    with torch.cuda.device(device):
        out = staged.to(device, non_blocking=True)
        queued()
    return out
