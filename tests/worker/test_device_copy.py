"""The pinned staging ring behind `to_device` (worker/device_copy.py): a copy's bytes are never
overwritten before the device has read them, the ring wraps, and values arrive intact. On the
CPU the device is simulated: each staged copy is "read" when its fake event completes, at random
later moments or when the ring waits for it."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from pdserve.worker.device_copy import PinnedRing, to_device


class FakeDevice:
    """Copies queued in order; a copy reads its staged bytes when it completes."""

    def __init__(self) -> None:
        self.queue: deque[FakeEvent] = deque()
        self.received: list[torch.Tensor] = []

    def complete_oldest(self) -> None:
        event = self.queue.popleft()
        self.received.append(event.staged.clone())  # what the device reads now
        event.done = True


class FakeEvent:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.done = False
        self.staged: torch.Tensor | None = None

    def record(self) -> None:
        self.done = False  # recorded again: it completes with its new copy
        self.device.queue.append(self)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        while not self.done:
            self.device.complete_oldest()


@pytest.mark.parametrize("seed", [random.randrange(2**32) for _ in range(3)])
def test_the_ring_never_overwrites_a_copy_the_device_has_not_read(seed: int) -> None:
    rng = random.Random(seed)
    device = FakeDevice()
    events: list[FakeEvent] = []

    def make_event() -> FakeEvent:
        events.append(FakeEvent(device))
        return events[-1]

    ring = PinnedRing(4096, pin=False, make_event=make_event)
    sent = []
    for _ in range(400):
        dtype = rng.choice([torch.int32, torch.int64, torch.float32, torch.bool, torch.uint8])
        n = rng.randint(0, 1024 // torch.empty(0, dtype=dtype).element_size())
        src = torch.randint(0, 2 if dtype == torch.bool else 100, (n,)).to(dtype)
        staged, queued = ring.stage(src)
        assert staged.dtype == dtype and staged.shape == src.shape
        queued()
        device.queue[-1].staged = staged  # the event just recorded: new or reused
        sent.append(src)
        while device.queue and rng.random() < 0.3:  # the device catches up now and then
            device.complete_oldest()
    while device.queue:
        device.complete_oldest()
    assert len(device.received) == len(sent)
    for got, want in zip(device.received, sent):
        assert torch.equal(got, want), f"seed {seed}: a staged copy was overwritten too early"
    assert len(events) < len(sent) // 2, "the events of completed copies were not reused"


def test_the_ring_records_its_events_where_it_is_told() -> None:
    device = FakeDevice()
    recorded: list[FakeEvent] = []

    def record(event: FakeEvent) -> None:
        recorded.append(event)
        event.record()

    ring = PinnedRing(4096, pin=False, make_event=lambda: FakeEvent(device), record=record)
    for i in range(20):
        staged, queued = ring.stage(torch.arange(100) + i)
        queued()
        device.queue[-1].staged = staged
        device.complete_oldest()
    assert [int(got[0]) for got in device.received] == list(range(20))
    assert len(recorded) == 20 and len({id(e) for e in recorded}) <= 2


def test_a_large_tensor_does_not_fit_the_ring() -> None:
    ring = PinnedRing(4096, pin=False, make_event=lambda: None)
    assert ring.fits(1024) and not ring.fits(1025)


def test_to_device_on_the_cpu_is_a_plain_copy() -> None:
    src = torch.arange(10)
    assert torch.equal(to_device(src, "cpu"), src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_delivers_every_value_through_many_wraps() -> None:
    rng = random.Random(0)
    outs, wants = [], []
    for _ in range(3000):  # ~64 MiB in all: the 32 MiB ring wraps
        n = rng.randint(1, 8192)
        src = torch.randint(-1000, 1000, (n,), dtype=rng.choice([torch.int32, torch.int64]))
        wants.append(src.clone())
        outs.append(to_device(src, "cuda"))
        src.fill_(0)  # the caller may reuse its tensor at once: the values were staged
    for out, want in zip(outs, wants):
        assert out.is_cuda and torch.equal(out.cpu(), want)
    big = torch.randn(3 << 20)  # larger than a quarter of the ring: pinned on its own
    assert torch.equal(to_device(big, "cuda").cpu(), big)
