"""The host-side launch helpers against Triton's own (kernels/launch_math.py replaces them in the
launch wrappers)."""

from __future__ import annotations

import random

import pytest

triton = pytest.importorskip("triton")

from pdserve.kernels.launch_math import cdiv, next_power_of_2  # noqa: E402


def test_next_power_of_2_equals_tritons() -> None:
    values = list(range(0, 5000)) + [random.randrange(1, 2**40) for _ in range(2000)]
    values += [2**k + d for k in range(1, 40) for d in (-1, 0, 1)]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_equals_tritons() -> None:
    for _ in range(5000):
        a, b = random.randrange(0, 2**32), random.randrange(1, 5000)
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for a in range(0, 300):
        for b in range(1, 40):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
