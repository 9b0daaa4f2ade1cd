"""The fault injector: off by default, seeded per worker, failing at the configured rates."""

from __future__ import annotations

import pytest

from pdserve.config.topology_sections import FaultInjectionConfig
from pdserve.fault_injection import NO_FAULTS, FaultInjector, InjectedFault, KVPushFault


def test_off_by_default_every_call_is_a_no_op() -> None:
    assert not NO_FAULTS.is_enabled
    for _ in range(1000):
        NO_FAULTS.before_step()
        assert NO_FAULTS.kv_push() == KVPushFault()
    assert NO_FAULTS.num_kv_failures == NO_FAULTS.num_step_failures == 0


def test_step_failures_come_at_their_rate_and_raise_injected_faults() -> None:
    faults = FaultInjector(FaultInjectionConfig(step_failure_prob=0.2, seed=1), "decode0")
    num_raised = 0
    for _ in range(2000):
        try:
            faults.before_step()
        except InjectedFault:
            num_raised += 1
    assert 300 <= num_raised <= 500 and num_raised == faults.num_step_failures


def test_kv_faults_split_before_and_after_and_delays_stay_in_range() -> None:
    config = FaultInjectionConfig(kv_failure_prob=0.5, kv_delay_s=0.01, seed=2)
    faults = FaultInjector(config, "prefill0")
    plans = [faults.kv_push() for _ in range(2000)]
    assert all(0 <= p.delay_s <= 0.01 for p in plans)
    assert not any(p.fail_before and p.fail_after for p in plans)
    num_before = sum(p.fail_before for p in plans)
    num_after = sum(p.fail_after for p in plans)
    assert 350 <= num_before <= 650 and 350 <= num_after <= 650
    assert num_before + num_after == faults.num_kv_failures


def test_a_seed_repeats_per_worker_and_differs_between_workers() -> None:
    config = FaultInjectionConfig(kv_failure_prob=0.5, seed=7)

    def run(name: str) -> list[KVPushFault]:
        faults = FaultInjector(config, name)
        return [faults.kv_push() for _ in range(64)]

    assert run("prefill0") == run("prefill0")
    assert run("prefill0") != run("prefill1")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kv_failure_prob": 1.5}, "kv_failure_prob"),
        ({"step_failure_prob": -0.1}, "step_failure_prob"),
        ({"kv_failure_prob": True}, "kv_failure_prob"),
        ({"kv_delay_s": -1}, "kv_delay_s"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_settings_are_refused_by_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}="):
        FaultInjectionConfig(**kwargs)


def test_an_idle_step_never_fails() -> None:
    faults = FaultInjector(FaultInjectionConfig(step_failure_prob=1.0, seed=0))
    faults.before_step(has_work=False)
    with pytest.raises(InjectedFault):
        faults.before_step(has_work=True)
    assert faults.num_step_failures == 1
