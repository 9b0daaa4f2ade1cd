"""Benchmark numbers: per-request results, their summary (percentiles, throughput, goodput), and
the result tables printed like vLLM's `bench serve`."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
_WIDTH = 50  # table width, as vLLM's


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default); 0.0 for no values."""
    if len(values) == 0:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class MetricStats:
    """One latency metric over the requests, in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float
    std: float
    count: int  # how many values went in (ITL: one per gap, not per request)

    @classmethod
    def of_seconds(cls, values_s: list[float]) -> MetricStats:
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        if ms.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        return cls(
            mean=float(ms.mean()),
            median=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
            std=float(ms.std()),
            count=int(ms.size),
        )


@dataclass
class RequestResult:
    """What one streamed request measured; times in seconds from when it was sent."""

    prompt_len: int
    output_len: int = 0  # tokens generated: usage.completion_tokens, else token chunks
    ttft: float = 0.0  # first chunk carrying a token
    itl: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    e2e: float = 0.0  # until the last token chunk
    error: str | None = None  # HTTP error, error event or exception; None: success

    @property
    def is_success(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class ServeSummary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    request_goodput: float | None  # requests meeting every given SLO / s; None: no SLO given
    input_throughput: float  # tok/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # tok/s
    ttft_ms: MetricStats
    tpot_ms: MetricStats
    itl_ms: MetricStats
    e2el_ms: MetricStats
    errors: dict[str, int]  # error message -> how many requests failed with it

    def flat(self) -> dict[str, Any]:
        """vLLM-style flat keys (`mean_ttft_ms`, `p99_itl_ms`, ...) for JSON output."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key.endswith("_ms"):
                name = key[: -len("_ms")]
                for stat, number in value.items():
                    out[f"{stat}_{name}_ms" if stat != "count" else f"num_{name}"] = number
            else:
                out[key] = value
        return out


def _meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and r.ttft * 1000.0 > slo_ttft_ms:
        return False
    tpot = r.tpot
    return slo_tpot_ms is None or tpot is None or tpot * 1000.0 <= slo_tpot_ms


def summarize_serve(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> ServeSummary:
    ok = [r for r in results if r.is_success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    duration = max(duration_s, 1e-9)
    goodput = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        goodput = sum(_meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok) / duration
    return ServeSummary(
        num_requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        request_goodput=goodput,
        input_throughput=total_in / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        ttft_ms=MetricStats.of_seconds([r.ttft for r in ok]),
        tpot_ms=MetricStats.of_seconds([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=MetricStats.of_seconds([gap for r in ok for gap in r.itl]),
        e2el_ms=MetricStats.of_seconds([r.e2e for r in ok]),
        errors=dict(Counter(r.error for r in results if r.error is not None).most_common()),
    )


@dataclass(frozen=True)
class OfflineSummary:
    num_requests: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests / s
    input_throughput: float  # tok/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # tok/s


def summarize_offline(
    num_requests: int, total_input_tokens: int, total_output_tokens: int, duration_s: float
) -> OfflineSummary:
    duration = max(duration_s, 1e-9)
    return OfflineSummary(
        num_requests=num_requests,
        duration_s=duration_s,
        total_input_tokens=total_input_tokens,
        total_output_tokens=total_output_tokens,
        request_throughput=num_requests / duration,
        input_throughput=total_input_tokens / duration,
        output_throughput=total_output_tokens / duration,
        total_token_throughput=(total_input_tokens + total_output_tokens) / duration,
    )


# ---------------------------------------------------------------------------- tables


def _title(text: str, fill: str) -> str:
    return f"{' ' + text + ' ' if fill == '=' else text:{fill}^{_WIDTH}}"


def _row(label: str, value: float | int) -> str:
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40} {shown}"


def _metric_rows(section: str, short: str, stats: MetricStats) -> list[str]:
    return [
        _title(section, "-"),
        _row(f"Mean {short} (ms):", stats.mean),
        _row(f"Median {short} (ms):", stats.median),
        _row(f"P90 {short} (ms):", stats.p90),
        _row(f"P99 {short} (ms):", stats.p99),
    ]


def format_serve_table(s: ServeSummary, max_errors: int = 5) -> str:
    lines = [
        _title("Serving Benchmark Result", "="),
        _row("Successful requests:", s.completed),
        _row("Failed requests:", s.failed),
        _row("Benchmark duration (s):", s.duration_s),
        _row("Total input tokens:", s.total_input_tokens),
        _row("Total generated tokens:", s.total_output_tokens),
        _row("Request throughput (req/s):", s.request_throughput),
    ]
    if s.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", s.request_goodput))
    lines += [
        _row("Input token throughput (tok/s):", s.input_throughput),
        _row("Output token throughput (tok/s):", s.output_throughput),
        _row("Total token throughput (tok/s):", s.total_token_throughput),
        *_metric_rows("Time to First Token", "TTFT", s.ttft_ms),
        *_metric_rows("Time per Output Token (excl. 1st token)", "TPOT", s.tpot_ms),
        *_metric_rows("Inter-token Latency", "ITL", s.itl_ms),
        *_metric_rows("End-to-end Latency", "E2EL", s.e2el_ms),
    ]
    lines += _error_rows(s, max_errors)
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _error_rows(s: ServeSummary, max_errors: int) -> list[str]:
    if not s.errors:
        return []
    rows = [_title("Errors", "-")]
    for message, count in list(s.errors.items())[:max_errors]:
        rows.append(f"{count:>6} x {message[:200]}")
    return rows


def format_embed_table(s: ServeSummary, max_errors: int = 5) -> str:
    """`bench serve --endpoint embeddings`: no tokens are generated, so throughput is requests
    and input tokens, and each request's latency is its whole round trip."""
    lines = [
        _title("Embeddings Benchmark Result", "="),
        _row("Successful requests:", s.completed),
        _row("Failed requests:", s.failed),
        _row("Benchmark duration (s):", s.duration_s),
        _row("Total input tokens:", s.total_input_tokens),
        _row("Request throughput (req/s):", s.request_throughput),
        _row("Input token throughput (tok/s):", s.input_throughput),
        *_metric_rows("Request Latency", "latency", s.e2el_ms),
        *_error_rows(s, max_errors),
        "=" * _WIDTH,
    ]
    return "\n".join(lines)


def format_offline_table(s: OfflineSummary) -> str:
    return "\n".join(
        [
            _title("Offline Benchmark Result", "="),
            _row("Requests:", s.num_requests),
            _row("Benchmark duration (s):", s.duration_s),
            _row("Total input tokens:", s.total_input_tokens),
            _row("Total generated tokens:", s.total_output_tokens),
            _row("Request throughput (req/s):", s.request_throughput),
            _row("Input token throughput (tok/s):", s.input_throughput),
            _row("Output token throughput (tok/s):", s.output_throughput),
            _row("Total token throughput (tok/s):", s.total_token_throughput),
            "=" * _WIDTH,
        ]
    )
