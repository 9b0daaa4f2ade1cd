"""`PDSERVE_TP_ONE_GPU=1`, the testing aid that runs a tensor-parallel worker's ranks on one GPU: a
CUDA worker's ranks then join over gloo and all take the first visible GPU (ModelRunner reads
`TPGroup.device_index`). Checked on CPU with two ranks in threads; the GPU runs that use it:
tests/e2e/test_gpu_tp_cuda_ipc.py."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
import torch.distributed as dist

from pdserve import env
from pdserve.worker.parallel.tp_group import TPGroup, init_tp_group


@pytest.mark.parametrize(
    ("value", "on"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)]
)
def test_tp_one_gpu_is_read_from_the_environment(value: str | None, on: bool) -> None:
    environ = {} if value is None else {env.TP_ONE_GPU_VAR: value}
    assert env.tp_one_gpu(environ) is on


def _join(device: str) -> list[TPGroup]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups: dict[int, TPGroup] = {}
    sums: dict[int, float] = {}

    def rank_main(rank: int) -> None:
        tp = init_tp_group(rank, 2, f"tcp://127.0.0.1:{port}", device)
        groups[rank] = tp
        sums[rank] = tp.all_reduce(torch.tensor([rank + 1.0])).item()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sums == {0: 3.0, 1: 3.0}
    return [groups[0], groups[1]]


def test_cuda_ranks_join_over_gloo_on_the_first_gpu_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(env.TP_ONE_GPU_VAR, "1")
    for tp in _join("cuda"):  # the CUDA branch, with CPU tensors: gloo takes both
        assert isinstance(tp.comm.group, dist.ProcessGroupGloo)
        assert tp.device_index == 0
        tp.comm.close()


def test_without_the_knob_cpu_ranks_keep_their_own_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(env.TP_ONE_GPU_VAR, raising=False)
    for tp in _join("cpu"):
        assert tp.device_index is None
        tp.comm.close()
