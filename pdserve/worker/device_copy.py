"""Host-to-device copies that do not wait for the device.

A plain `tensor.to("cuda")` from pageable memory waits until the stream's queued work is done,
which would stall the overlapped loop (worker_core.py) on the step still running. Copying through
pinned memory with non_blocking=True does not wait; torch's caching host allocator keeps the
pinned block until its copy is done.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued behind the device's work, not waited for."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
