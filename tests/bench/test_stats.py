"""Benchmark statistics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.stats import (
    MetricStats,
    RequestResult,
    format_serve_table,
    percentile,
    summarize_offline,
    summarize_serve,
)


def test_percentile_interpolates_linearly() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([], 99) == 0.0


def test_metric_stats_are_in_milliseconds() -> None:
    stats = MetricStats.of_seconds([0.001, 0.002, 0.003, 0.004])
    assert stats.mean == pytest.approx(2.5)
    assert stats.median == pytest.approx(2.5)
    assert stats.p90 == pytest.approx(3.7)
    assert stats.p99 == pytest.approx(3.97)
    assert stats.std == pytest.approx(math.sqrt(1.25))
    assert stats.count == 4
    assert MetricStats.of_seconds([]) == MetricStats(0.0, 0.0, 0.0, 0.0, 0.0, 0)


def test_tpot_excludes_the_first_token() -> None:
    r = RequestResult(prompt_len=4, output_len=11, ttft=0.5, e2e=1.5)
    assert r.tpot == pytest.approx(0.1)
    assert RequestResult(prompt_len=4, output_len=1, ttft=0.5, e2e=0.5).tpot is None


def _results() -> list[RequestResult]:
    fast = RequestResult(prompt_len=10, output_len=3, ttft=0.1, itl=[0.02, 0.04], e2e=0.16)
    slow = RequestResult(prompt_len=20, output_len=5, ttft=0.3, itl=[0.1] * 4, e2e=0.7)
    failed = RequestResult(prompt_len=30, error="HTTP 500: overloaded")
    failed_too = RequestResult(prompt_len=30, error="HTTP 500: overloaded")
    return [fast, slow, failed, failed_too]


def test_summary_counts_only_successes_in_throughput_and_latency() -> None:
    s = summarize_serve(_results(), duration_s=2.0)
    assert (s.num_requests, s.completed, s.failed) == (4, 2, 2)
    assert (s.total_input_tokens, s.total_output_tokens) == (30, 8)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.input_throughput == pytest.approx(15.0)
    assert s.output_throughput == pytest.approx(4.0)
    assert s.total_token_throughput == pytest.approx(19.0)
    assert s.ttft_ms.mean == pytest.approx(200.0)
    # TPOT: fast (0.16 - 0.1) / 2 = 0.03, slow (0.7 - 0.3) / 4 = 0.1
    assert s.tpot_ms.mean == pytest.approx(65.0)
    # ITL pools every gap: [20, 40, 100, 100, 100, 100] ms
    assert s.itl_ms.count == 6
    assert s.itl_ms.mean == pytest.approx(460.0 / 6)
    assert s.itl_ms.median == pytest.approx(100.0)
    assert s.e2el_ms.p90 == pytest.approx(160.0 + 0.9 * 540.0)
    assert s.errors == {"HTTP 500: overloaded": 2}
    assert s.request_goodput is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    assert summarize_serve(_results(), 2.0, slo_ttft_ms=200.0).request_goodput == 0.5
    assert summarize_serve(_results(), 2.0, slo_tpot_ms=100.0).request_goodput == 1.0
    both = summarize_serve(_results(), 2.0, slo_ttft_ms=400.0, slo_tpot_ms=50.0)
    assert both.request_goodput == 0.5


def test_table_and_flat_keys() -> None:
    s = summarize_serve(_results(), duration_s=2.0, slo_ttft_ms=200.0)
    table = format_serve_table(s)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Failed requests:                         2" in lines
    assert any(line.startswith("Request goodput (req/s):") for line in lines)
    assert "     2 x HTTP 500: overloaded" in lines
    flat = s.flat()
    assert flat["p99_ttft_ms"] == s.ttft_ms.p99
    assert flat["num_itl"] == 6
    assert flat["completed"] == 2


def test_offline_summary_rates() -> None:
    s = summarize_offline(8, total_input_tokens=128, total_output_tokens=64, duration_s=4.0)
    assert s.request_throughput == 2.0
    assert s.input_throughput == 32.0
    assert s.output_throughput == 16.0
    assert s.total_token_throughput == 48.0
