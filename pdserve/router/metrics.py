"""Prometheus metrics of the router, in its own registry, prefix `pdserve_`.

Request metrics are observed as outputs pass through the router. Per-worker numbers (load, pages,
health, KV transfer totals) are read from the latest load reports at scrape time by a collector,
so cumulative counters from the workers are exposed as they are, never re-added. Every supervised
process (tokenizers included) has a health gauge and a count of the exits the launcher reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdserve.router.worker_registry import ProcessState, WorkerState

FINISH_LABELS = ("stop", "length", "abort", "error")
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)


class WorkerCollector(Collector):
    """Gauges and cumulative counters per worker, from the latest load reports."""

    def __init__(self, workers: Callable[[], Iterable[WorkerState]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"pdserve_{name}", doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"pdserve_{name}", doc, labels=labels)

        running = gauge("num_running_reqs", "Requests in the worker's running batch")
        queued = gauge("num_queue_reqs", "Requests waiting in the worker's queue")
        used = gauge("kv_pages_used", "KV cache pages in use")
        total = gauge("kv_pages_total", "KV cache pages in the pool")
        hit_rate = gauge("cache_hit_rate", "Prefix cache hit rate")
        healthy = gauge("worker_healthy", "1 while the worker's load reports keep arriving")
        latency = gauge("kv_transfer_latency_seconds", "Mean seconds per KV transfer")
        tx_bytes = counter("kv_transfer_bytes", "KV bytes transferred")
        tx_seconds = counter("kv_transfer_seconds", "Seconds spent transferring KV")
        tx_count = counter("kv_transfers", "KV transfers completed")
        spec_rows = counter("spec_verify_rows", "Rows verified by speculative decoding")
        spec_tokens = counter("spec_tokens", "Tokens produced by speculatively verified rows")
        accept = gauge("spec_accept_length", "Mean tokens per speculative verify row")
        for state in self.workers():
            values = [state.name, state.spec.role]
            healthy.add_metric(values, 1.0 if state.is_healthy else 0.0)
            r = state.report
            if r is None:
                continue
            running.add_metric(values, r.num_running)
            queued.add_metric(values, r.num_queued)
            used.add_metric(values, r.num_total_pages - r.num_free_pages)
            total.add_metric(values, r.num_total_pages)
            hit_rate.add_metric(values, r.cache_hit_rate)
            tx_bytes.add_metric(values, r.kv_transfer_bytes)
            tx_seconds.add_metric(values, r.kv_transfer_seconds)
            tx_count.add_metric(values, r.num_kv_transfers)
            mean = r.kv_transfer_seconds / r.num_kv_transfers if r.num_kv_transfers else 0.0
            latency.add_metric(values, mean)
            if r.num_spec_row_steps:
                spec_rows.add_metric(values, r.num_spec_row_steps)
                spec_tokens.add_metric(values, r.num_spec_tokens)
                accept.add_metric(values, r.num_spec_tokens / r.num_spec_row_steps)
        yield from (running, queued, used, total, hit_rate, healthy, latency)
        yield from (tx_bytes, tx_seconds, tx_count, spec_rows, spec_tokens, accept)


class ProcessCollector(Collector):
    """Health of every tokenizer and worker, from the router's liveness view."""

    def __init__(self, processes: Callable[[], Iterable[ProcessState]]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "pdserve_process_healthy",
            "1 while the process is heard from (heartbeats), 0 while starting, lost or restarting",
            labels=["process", "kind"],
        )
        for state in self.processes():
            healthy.add_metric([state.name, state.kind], 1.0 if state.is_healthy else 0.0)
        yield healthy


class RouterMetrics:
    def __init__(
        self,
        model_name: str,
        workers: Callable[[], Iterable[WorkerState]],
        processes: Callable[[], Iterable[ProcessState]] = tuple,
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        reg, lbl = self.registry, ["model_name"]
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds", "Time to first token", lbl,
            buckets=_TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "pdserve_inter_token_latency_seconds", "Time between tokens (per token)", lbl,
            buckets=_ITL_BUCKETS, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds", "Request latency, arrival to finish", lbl,
            buckets=_E2E_BUCKETS, registry=reg,
        )  # fmt: skip
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", lbl, registry=reg)
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Generated tokens", lbl, registry=reg
        )
        self.cached_tokens = Counter(
            "pdserve_cached_tokens", "Prompt tokens served from the prefix cache", lbl, registry=reg
        )
        self.requests = Counter(
            "pdserve_requests", "Finished requests (sub-requests of n > 1 count one each)",
            ["model_name", "finish_reason"], registry=reg,
        )  # fmt: skip
        for reason in FINISH_LABELS:
            self.requests.labels(model_name, reason)  # present at 0 from the start
        self.process_exits = Counter(
            "pdserve_process_exits", "Tokenizer and worker exits the launcher reported",
            ["process"], registry=reg,
        )  # fmt: skip
        self.registry.register(WorkerCollector(workers))
        self.registry.register(ProcessCollector(processes))
        # The per-token histograms with their one label bound once: a label lookup per streamed
        # token was a measurable share of the router's CPU.
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)

    def observe_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, num_tokens: int) -> None:
        per_token = seconds / max(num_tokens, 1)
        for _ in range(max(num_tokens, 1)):
            self._itl.observe(per_token)

    def observe_finish(
        self,
        finish_reason: str,
        e2e_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
    ) -> None:
        m = self.model_name
        self.requests.labels(m, finish_reason).inc()
        self.e2e.labels(m).observe(e2e_s)
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.cached_tokens.labels(m).inc(cached_tokens)

    def observe_process_exit(self, name: str) -> None:
        self.process_exits.labels(name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
