"""Choosing the transfer backend from where the two pools live."""

from __future__ import annotations

import pytest
import torch

from pdserve.kv_transfer import make_receiver, make_sender, resolve_backend


@pytest.mark.parametrize(
    ("prefill", "decode", "same_node", "expected"),
    [
        ("cpu", "cpu", True, "tcp"),
        ("cuda:0", "cpu", True, "tcp"),
        ("cuda:0", "cuda:0", True, "cuda_ipc"),
        ("cuda:0", "cuda:1", True, "nccl"),
        ("cuda:0", "cuda:0", False, "nccl"),  # GPU 0 of two different nodes
    ],
)
def test_auto_picks_by_placement(prefill, decode, same_node, expected):
    assert resolve_backend("auto", prefill, decode, same_node=same_node) == expected


@pytest.mark.parametrize(
    ("backend", "prefill", "decode", "same_node", "message"),
    [
        ("cuda_ipc", "cpu", "cpu", True, "CPU pool"),
        ("cuda_ipc", "cuda:0", "cuda:1", False, "different nodes"),
        ("nccl", "cuda:2", "cuda:2", True, "two ranks on one device"),
        ("nccl", "cuda:0", "cpu", True, "both CPU"),
        ("rdma", "cuda:0", "cuda:1", True, "expected one of"),
    ],
)
def test_impossible_choices_are_refused(backend, prefill, decode, same_node, message):
    with pytest.raises(ValueError, match=message):
        resolve_backend(backend, prefill, decode, same_node=same_node)


def test_explicit_choices_that_work_are_kept():
    assert resolve_backend("tcp", "cuda:0", "cuda:0") == "tcp"
    assert resolve_backend("nccl", "cpu", "cpu") == "nccl"  # gloo
    assert resolve_backend("nccl", torch.device("cuda", 0), "cuda:3") == "nccl"


def test_factories_refuse_unknown_backends_and_cuda_ipc_on_cpu():
    pool = torch.zeros(1, 2, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="expected one of"):
        make_receiver("rdma", pool)
    with pytest.raises(ValueError, match="expected one of"):
        make_sender("rdma", pool)
    with pytest.raises(ValueError, match="CUDA KV pool"):
        make_receiver("cuda_ipc", pool)
    with pytest.raises(ValueError, match="KV pool shape"):
        make_receiver("tcp", torch.zeros(2, 3, 4))
