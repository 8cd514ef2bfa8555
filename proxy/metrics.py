"""The Prometheus registry (prefix fullpower_). Request-path figures are counted as they happen;
pool and queue figures are read from their owners at scrape time, so there is no second copy of
that state. Label values are bounded: tiers, models, pools, worker ids, outcomes - never request
ids or keys."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

# 1 ms .. 60 s, dense around the 1.5 s P99 alert.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   10.0, 20.0, 30.0, 60.0)
FINE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OUTCOMES = ("served", "shed", "timeout", "cancelled", "error", "invalid")


class Metrics:
    def __init__(self) -> None:
        self._children: dict = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory, open fds (the CPU alert)
        # Counted once or more per request on the event loop's thread only: LoopCounter (no lock).
        self.requests = LoopCounter("fullpower_requests", "Requests by tier, model, HTTP status and outcome",
                                ["tier", "model", "status", "outcome"], registry=r)
        self.duration = LoopHistogram("fullpower_request_duration_seconds", "Total time of a request", ["tier"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = LoopHistogram("fullpower_queue_wait_seconds", "Time spent in the admission queue",
                                        ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = LoopHistogram("fullpower_time_to_first_token_seconds", "Arrival to first token", ["tier"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        # Histograms are observed on the event loop's thread only: LoopHistogram (no lock per observation).
        self.inter_token = LoopHistogram("fullpower_inter_token_seconds", "Time between streamed frames", ["tier"],
                                         buckets=FINE_BUCKETS + (10.0, 30.0, 60.0), registry=r)
        self.overhead = LoopHistogram("fullpower_proxy_overhead_seconds", "Time spent in the proxy itself",
                                      buckets=FINE_BUCKETS, registry=r)
        self.tokens = LoopCounter("fullpower_tokens", "Tokens processed", ["tier", "kind"], registry=r)
        self.retries = Counter("fullpower_retries", "Requests retried on another worker before the first byte",
                               ["reason"], registry=r)
        self.resumes = Counter("fullpower_stream_resumes", "Generations resumed on another worker after tokens "
                               "were sent", registry=r)
        self.cancellations = Counter("fullpower_cancellations", "Generations cancelled because the client left",
                                     ["stage"], registry=r)
        self.ejections = Counter("fullpower_worker_ejections", "Workers ejected by outlier detection", ["pool"],
                                 registry=r)
        self.scaling_events = Counter("fullpower_scaling_events", "Cold workers started (up) or stopped (down)",
                                      ["pool", "direction"], registry=r)
        self.config_reloads = Counter("fullpower_config_reloads", "Configuration reloads", ["result"], registry=r)
        self.cache_requests = LoopCounter("fullpower_cache_requests", "Answers by cache outcome (miss, hit, coalesced, "
                                      "bypass)", ["result"], registry=r)
        self.cache_evictions = Counter("fullpower_cache_evictions", "Entries evicted from the cache", ["tier"],
                                       registry=r)
        self.cache_disk_errors = Counter("fullpower_cache_disk_errors", "Disk cache failures (memory only for a "
                                         "while)", registry=r)
        self.degraded = Counter("fullpower_degraded_requests", "Requests sent to a tier's fallback pool",
                                ["tier", "pool"], registry=r)
        self.jobs_finished = Counter("fullpower_jobs_finished", "Jobs that reached a final state", ["status"],
                                     registry=r)
        self.job_callbacks = Counter("fullpower_job_callbacks", "Job callback delivery attempts", ["result"],
                                     registry=r)
        self.rate_limited = Counter("fullpower_rate_limited", "Requests refused by a key's rate limit",
                                    ["tier", "limit"], registry=r)

        # The public listener's fast lane (proxy/http/fast_lane.py): how much it serves, how often it hands over.
        self.fast_lane_requests = LoopCounter("fullpower_fast_lane_requests", "Requests answered on the fast lane",
                                          registry=r)
        self.fast_lane_handovers = Counter("fullpower_fast_lane_handovers", "Connections handed from the fast "
                                           "lane to aiohttp (another endpoint or method, an unusual request)",
                                           registry=r)

        # Shared state (Redis) across appliances; `op` is one of a fixed set of operation names.
        self.shared_seconds = LoopHistogram("fullpower_shared_state_seconds", "Time of one shared-state (Redis) call",
                                            ["op"], buckets=FINE_BUCKETS, registry=r)
        self.shared_fallbacks = Counter("fullpower_shared_state_fallbacks", "Shared-state operations that used "
                                        "this host's local path because Redis was unreachable", ["op"], registry=r)
        self.shared_up = Gauge("fullpower_shared_state_up", "1 while shared state (Redis) is configured and reachable; 0 while "
                               "this host falls back to local limits and cache", registry=r)

    def child(self, metric, *labels):
        """metric.labels(*labels), memoised: prometheus-client's labels() costs microseconds on the
        hot path, and our label sets are few and bounded."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def add_collector(self, collect: Callable[[], list]) -> None:
        class _Adapter:
            def collect(self_inner):
                return collect()

        self.registry.register(_Adapter())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LoopMetric:
    """What the request path's metrics share: written only from the event loop's thread (no
    lock), one child per label values, the exposition built at scrape time. Subclasses say what a
    child is (`_new_child`) and which metric family they expose (`family`)."""

    family = None  # prometheus-client's MetricFamily class of the exposition

    def __init__(self, name: str, documentation: str, labelnames: list[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        # without labels: one child, exposed (all zero) from the start as prometheus-client does
        self._unlabelled = None if self.labelnames else self.labels()
        registry.register(self)

    def _new_child(self):
        raise NotImplementedError

    def labels(self, *values: str):
        values = tuple(str(v) for v in values)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def describe(self):
        return [self.family(self.name, self.documentation, labels=self.labelnames)]


class LoopHistogram(_LoopMetric):
    """A histogram of request-path figures (per request, and inter-token per streamed token).
    prometheus-client's Histogram takes a lock and walks its buckets on every observation (about a
    microsecond, ~9% of the proxy's CPU per streamed token); this one bisects and adds, and builds
    the same exposition (cumulative `le` buckets, `_sum`, `_count`) at scrape time."""

    family = HistogramMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: list[str] = (), *, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.buckets = tuple(sorted(buckets))
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> "_LoopHistogramChild":
        return _LoopHistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        """For a histogram without labels."""
        self._unlabelled.observe(value)

    def collect(self):
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        bounds = [repr(float(b)) for b in self.buckets] + ["+Inf"]
        for values, child in list(self._children.items()):
            counts, total, cumulative = list(child.counts), child.sum, 0
            buckets = []
            for bound, n in zip(bounds, counts):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, total)
        return [family]


class _LoopHistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' `le`
        self.sum += value


class LoopCounter(_LoopMetric):
    """A counter of request-path events. prometheus-client's Counter takes a lock on every
    increment (1-2 µs, several per request, ~6% of the proxy's CPU per cache hit); this one adds,
    and builds the same exposition (`_total`, `_created`) at scrape time."""

    family = CounterMetricFamily

    def _new_child(self) -> "_LoopCounterChild":
        return _LoopCounterChild()

    def inc(self, amount: float = 1) -> None:
        """For a counter without labels."""
        self._unlabelled.inc(amount)

    def collect(self):
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value, created=child.created)
        return [family]


class _LoopCounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount
