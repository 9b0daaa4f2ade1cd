"""Host-to-device copies that do not wait for the device.

A plain `tensor.to("cuda")` from pageable memory waits until the stream's queued work is done,
which would stall the overlapped loop (worker_core.py) on the step still running. Copying from
pinned memory with non_blocking=True does not wait. `tensor.pin_memory()` per copy costs ~0.5 ms
on the H200 host (eight of them a step made a constrained decode step 2.8 ms longer), so small
tensors are staged through one pinned ring buffer instead: each copy takes the next free bytes,
and bytes are reused only after the copy that read them has completed (a CUDA event per copy).

Host time matters here (a decode step's copies sit on the overlapped loop's host path):
`torch.cuda.current_stream()` builds a new Stream object on every call (tens of microseconds on a
slow host, and `Event.record()` without a stream calls it), so `current_stream` keeps the object
per stream id, and the ring reuses the events of copies that have completed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

RING_BYTES = 32 << 20  # pinned staging for the small per-step tensors (sampling batch, LoRA)
_ALIGN = 64


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """`torch.cuda.current_stream(device)` (device: a CUDA device with its index), the Python
    object kept per stream: asking torch for the current stream's id is cheap, building its
    Stream object is not."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = torch._C._cuda_getCurrentStream(index)  # (stream id, device index, device type)
    stream = _streams.get(raw)
    if stream is None:
        stream = _streams[raw] = torch.cuda.Stream(
            stream_id=raw[0], device_index=raw[1], device_type=raw[2]
        )
    return stream


_streams: dict[tuple[int, int, int], torch.cuda.Stream] = {}


def record_event(device: torch.device, event: torch.cuda.Event | None = None) -> torch.cuda.Event:
    """`event` (a new one when None) recorded on `device`'s current stream."""
    event = torch.cuda.Event() if event is None else event
    event.record(current_stream(device))
    return event


class PinnedRing:
    """A ring of host bytes (pinned on CUDA) that copies stage through. `make_event()` returns
    an object with record(), query() and synchronize() (a torch.cuda.Event on CUDA); `record`
    (event): records it where the copies are queued (event.record() when None). An event whose
    copy has completed is recorded again for a later copy."""

    def __init__(
        self,
        nbytes: int,
        pin: bool,
        make_event: Callable[[], Any],
        record: Callable[[Any], None] | None = None,
    ) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.head = 0
        self.make_event = make_event
        self.record = record
        self.in_flight: deque[tuple[int, int, Any]] = deque()  # (start, end, event), oldest first
        self._spare: list[Any] = []  # events whose copies completed

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
            event = self._spare.pop() if self._spare else self.make_event()
            if self.record is None:
                event.record()
            else:
                self.record(event)
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
            event = self.in_flight.popleft()[2]
            event.synchronize()
            self._spare.append(event)
        while self.in_flight and self.in_flight[0][2].query():
            self._spare.append(self.in_flight.popleft()[2])
        self.head = end
        return start


_rings: dict[torch.device, PinnedRing] = {}


def _ring(device: torch.device) -> tuple[torch.device, PinnedRing]:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ring = _rings.get(device)
    if ring is None:
        ring = _rings[device] = PinnedRing(
            RING_BYTES, True, torch.cuda.Event, lambda event: record_event(device, event)
        )
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
        # (copy_ and to() queue on the target device's current stream, where queued() records)
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
