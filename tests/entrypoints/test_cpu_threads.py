"""CPU workers share the node's cores instead of each taking all of them."""

from __future__ import annotations

from pdserve.entrypoints.launch import cpu_threads_per_worker


def test_cores_are_shared_out_and_every_worker_gets_at_least_one() -> None:
    assert cpu_threads_per_worker(2, num_cores=16) == 8
    assert cpu_threads_per_worker(3, num_cores=16) == 5
    assert cpu_threads_per_worker(4, num_cores=2) == 1
    assert cpu_threads_per_worker(0, num_cores=2) == 2
