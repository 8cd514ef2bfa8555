"""What one request did, recorded once at its end: the structured access log line and the metrics."""

from __future__ import annotations

import itertools
import logging
import os
import time

import msgspec

from proxy.errors import ApiError, NoWorkerReady, Overloaded, SlowClient, UpstreamTimeout
from proxy.metrics import Metrics

access_log = logging.getLogger("fullpower.access")
_json = msgspec.json.Encoder()


class RequestRecord:
    __slots__ = ("id", "started", "client", "method", "path", "key", "tier", "model", "status", "outcome",
                 "queue_s", "ttft_s", "prompt_tokens", "completion_tokens", "worker", "served_model", "failovers",
                 "overhead_s", "error", "cache", "cache_header", "planned_model")

    def __init__(self, request_id: str, client: str, method: str, path: str) -> None:
        self.id = request_id
        self.started = time.monotonic()
        self.client = client
        self.method = method
        self.path = path
        self.key = self.tier = self.model = self.worker = self.served_model = self.error = self.cache = None
        self.cache_header = None  # what X-Fullpower-Cache tells the client (cache is the truth)
        # `model` is what the client asked for (any string: logged, truncated, never a metric
        # label); `planned_model` is a served model the request was planned for.
        self.planned_model = None
        self.status = 200
        self.outcome = "served"
        self.queue_s = self.ttft_s = self.overhead_s = None
        self.prompt_tokens = self.completion_tokens = 0
        self.failovers = 0

    def parsed(self, model: str) -> None:
        """The model the request's body names (a Planner callback: known before planning may refuse it)."""
        self.model = model

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            self.status = exc.status
            self.error = exc.code or exc.type
            if isinstance(exc, (Overloaded, NoWorkerReady)):
                self.outcome = "shed"
            elif isinstance(exc, UpstreamTimeout):
                self.outcome = "timeout"
            elif exc.status < 500:
                self.outcome = "invalid"
            else:
                self.outcome = "error"
        else:
            reason = "client_too_slow" if isinstance(exc, SlowClient) else "client_closed_request"
            self.status, self.outcome, self.error = 499, "cancelled", reason

    def finish(self, metrics: Metrics) -> None:
        total = time.monotonic() - self.started
        tier = self.tier or "none"
        if self.path.startswith("/v1/") and self.method == "POST":
            child = metrics.child
            # Label values stay bounded: only models this server serves, else "unknown".
            model = self.served_model or self.planned_model or ("unknown" if self.model else "none")
            child(metrics.requests, tier, model, str(self.status),
                  self.outcome).inc()
            child(metrics.duration, tier).observe(total)
            if self.queue_s is not None:
                child(metrics.queue_wait, tier).observe(self.queue_s)
            if self.ttft_s is not None:
                child(metrics.ttft, tier).observe(self.ttft_s)
            if self.overhead_s is not None:
                metrics.overhead.observe(self.overhead_s)
            if self.prompt_tokens or self.completion_tokens:
                child(metrics.tokens, tier, "prompt").inc(self.prompt_tokens)
                child(metrics.tokens, tier, "completion").inc(self.completion_tokens)
        # Probes and admin calls would drown the log: one line per API request.
        if self.path.startswith("/v1/") and access_log.isEnabledFor(logging.INFO):
            access_log.info(_json.encode({
                "id": self.id, "client": self.client, "method": self.method, "path": self.path,
                "key": self.key, "tier": self.tier, "model": self.served_model or (self.model or "")[:100] or None,
                "worker": self.worker,
                "status": self.status, "outcome": self.outcome, "error": self.error,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "queue_ms": _ms(self.queue_s), "ttft_ms": _ms(self.ttft_s), "total_ms": _ms(total),
                "overhead_ms": _ms(self.overhead_s), "failovers": self.failovers or None, "cache": self.cache,
            }).decode())


_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """Unique per process start, and cheap: uuid4 reads the kernel's random source every call,
    which showed up as 10% of the proxy's time at saturation."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
