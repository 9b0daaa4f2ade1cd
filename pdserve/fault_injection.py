"""Faults on purpose, for tests: KV pushes that fail or lag, and worker steps that fail or lag.

The topology's `fault_injection:` section (off by default) reaches every worker in its
`WorkerSpec`; the worker builds one `FaultInjector` from it and hands it to its KV sender
(`KVSender.faults`, applied in `send()`) and calls `before_step()` at the top of each forward
step. A test then runs a load and checks that every request still ends, none hangs, and every
page returns. The idea is SGLang's `DISAGGREGATION_TEST_FAILURE_PROB`, as a typed config.
"""

from __future__ import annotations

import random
import time
import zlib
from typing import NamedTuple

from pdserve.config.topology_sections import FaultInjectionConfig


class InjectedFault(RuntimeError):
    """A failure made on purpose by fault injection."""


class KVPushFault(NamedTuple):
    """What happens to one KV push: a delay first, then perhaps a failure before any byte moves
    or after all of them moved (the decode worker then holds landed bytes it must drop)."""

    delay_s: float = 0.0
    fail_before: bool = False
    fail_after: bool = False


_NO_FAULT = KVPushFault()


class FaultInjector:
    """One worker's faults. Seeded (config.seed mixed with the worker's name) so that a test run
    repeats, yet two workers do not fail in lockstep."""

    def __init__(self, config: FaultInjectionConfig | None = None, name: str = "") -> None:
        self.config = config or FaultInjectionConfig()
        seed = self.config.seed
        self._rng = random.Random(None if seed is None else seed ^ zlib.crc32(name.encode()))
        self.num_kv_failures = 0
        self.num_step_failures = 0

    @property
    def is_enabled(self) -> bool:
        return self.config.is_enabled

    def kv_push(self) -> KVPushFault:
        """The fault of the next KV push (none when fault injection is off)."""
        c = self.config
        if not (c.kv_failure_prob or c.kv_delay_s):
            return _NO_FAULT
        delay_s = self._rng.uniform(0.0, c.kv_delay_s) if c.kv_delay_s else 0.0
        fails = self._rng.random() < c.kv_failure_prob
        if fails:
            self.num_kv_failures += 1
        before = fails and self._rng.random() < 0.5
        return KVPushFault(delay_s, fail_before=before, fail_after=fails and not before)

    def before_step(self, has_work: bool = True) -> None:
        """Call first thing in each forward step: raises InjectedFault with step_failure_prob,
        before the step changed anything, so the worker's step error handling runs. A step with
        no work (an idle loop turn) never fails: that would only fill the log."""
        if has_work and self.config.step_delay_s:  # a device this much slower per step
            time.sleep(self.config.step_delay_s)
        p = self.config.step_failure_prob
        if p and has_work and self._rng.random() < p:
            self.num_step_failures += 1
            raise InjectedFault("injected step failure (fault_injection.step_failure_prob)")


NO_FAULTS = FaultInjector()  # the default of every KV sender: every call a no-op
