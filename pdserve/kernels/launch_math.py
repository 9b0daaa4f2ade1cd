"""Host-side integer helpers for sizing kernel launches, in plain Python: since Triton 3.4,
`triton.cdiv` and `triton.next_power_of_2` are ConstexprFunctions that cost ~3 us a call from the
host (Triton 3.9 on this repository's CPU box; 0.1 us here), and the launch wrappers call them a
few times per launch, several launches a layer in an eager step."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers (b > 0), as triton.cdiv."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1); 0 for n <= 0, as triton.next_power_of_2 gives for 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
