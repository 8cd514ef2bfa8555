"""Scrape-time metric collectors: figures read from their owners (PoolState, the admission gate,
the answer cache, the job service) when Prometheus asks, so there is no second copy of that state.
Only the composition root imports this module."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from backend.protocol import HOST_PARTS
from proxy.fleet.pool import WorkerState


def pool_collector(pools, gate) -> Callable[[], list]:
    """Per-worker and per-queue figures, read from PoolState and the admission gate at scrape time."""
    def collect() -> list:
        now = time.monotonic()
        state = GaugeMetricFamily("fullpower_worker_state", "1 for the state the worker is in",
                                  labels=["worker", "pool", "state"])
        inflight = GaugeMetricFamily("fullpower_worker_inflight", "Requests routed to the worker",
                                     labels=["worker", "pool"])
        running = GaugeMetricFamily("fullpower_worker_batch_size", "Sequences the worker is decoding (its report)",
                                    labels=["worker", "pool"])
        restarts = CounterMetricFamily("fullpower_worker_restarts", "Times the worker process was replaced",
                                       labels=["worker", "pool"])
        boot_fail = CounterMetricFamily("fullpower_worker_boot_failures", "Consecutive failures at boot",
                                        labels=["worker", "pool"])
        breaker = GaugeMetricFamily("fullpower_worker_breaker_state", "1 for the breaker state of the worker",
                                    labels=["worker", "pool", "state"])
        hb_age = GaugeMetricFamily("fullpower_worker_heartbeat_age_seconds", "Seconds since the last heartbeat",
                                   labels=["worker", "pool"])
        slots = GaugeMetricFamily("fullpower_worker_kv_slots", "Sequences the worker's KV cache holds "
                                  "(batch size / slots = KV use)", labels=["worker", "pool"])
        memory = GaugeMetricFamily("fullpower_worker_memory_bytes", "Resident memory of the worker process",
                                   labels=["worker", "pool"])
        gpu_memory = GaugeMetricFamily("fullpower_worker_gpu_memory_bytes", "GPU memory held by the worker",
                                       labels=["worker", "pool"])
        weights = GaugeMetricFamily("fullpower_worker_weight_bytes", "Memory of the model's weights as the worker "
                                    "loaded them (after quantisation)", labels=["worker", "pool"])
        tokens = CounterMetricFamily("fullpower_worker_generated_tokens", "Tokens the worker process generated "
                                     "(resets when it restarts)", labels=["worker", "pool"])
        host = CounterMetricFamily("fullpower_worker_host_seconds", "The worker's engine loop's host time by part: "
                                   "encode, prefill, launch, collect (waiting for the device's tokens), advance "
                                   "(text and frames), emit (resets when it restarts)", labels=["worker", "pool", "part"])
        steps = CounterMetricFamily("fullpower_worker_decode_steps", "Decode steps the worker's engine ran "
                                    "(resets when it restarts)", labels=["worker", "pool"])
        for w in pools.workers.values():
            labels = [w.id, w.pool]
            for s in WorkerState:
                state.add_metric(labels + [s.value], 1.0 if w.state is s else 0.0)
            inflight.add_metric(labels, w.inflight)
            for b in ("closed", "open", "half_open"):
                breaker.add_metric(labels + [b], 1.0 if w.breaker.state == b else 0.0)
            running.add_metric(labels, w.engine_running)
            restarts.add_metric(labels, w.restarts)
            boot_fail.add_metric(labels, w.boot_failures)
            hb_age.add_metric(labels, now - w.last_heartbeat if w.last_heartbeat else 0.0)
            tokens.add_metric(labels, w.generated_tokens)
            for part in HOST_PARTS:  # a fixed label set, whatever a worker reports
                host.add_metric(labels + [part], w.host_seconds.get(part, 0.0))
            steps.add_metric(labels, w.decode_steps)
            slots.add_metric(labels, w.kv_slots)
            memory.add_metric(labels, w.memory_bytes)
            gpu_memory.add_metric(labels, w.gpu_memory_bytes)
            weights.add_metric(labels, w.weight_bytes)
        depth = GaugeMetricFamily("fullpower_queue_depth", "Requests waiting for admission", labels=["pool", "tier"])
        active = GaugeMetricFamily("fullpower_inflight_requests", "Requests admitted and running",
                                   labels=["pool", "tier"])
        for pool, admission in gate.admissions.items():
            for tier in admission.tiers:
                depth.add_metric([pool, tier], admission.queued(tier))
                active.add_metric([pool, tier], admission.active_in(tier))
        return [state, inflight, running, restarts, boot_fail, breaker, hb_age, tokens, host, steps, slots, memory,
                gpu_memory, weights, depth, active]

    return collect


def cache_collector(cache) -> Callable[[], list]:
    """Memory-tier size at scrape time (the disk tier's size is read off the loop: /admin/cache)."""

    def collect() -> list:
        entries = GaugeMetricFamily("fullpower_cache_entries", "Entries in the memory cache", labels=["tier"])
        size = GaugeMetricFamily("fullpower_cache_bytes", "Bytes in the memory cache", labels=["tier"])
        memory = cache.memory
        entries.add_metric(["memory"], len(memory) if memory is not None else 0)
        size.add_metric(["memory"], memory.currsize if memory is not None else 0)
        return [entries, size]

    return collect


def jobs_collector(jobs) -> Callable[[], list]:
    """Jobs by state and the age of the oldest queued job (refreshed every second off the loop)."""

    def collect() -> list:
        by_state = GaugeMetricFamily("fullpower_jobs", "Jobs by state", labels=["state"])
        for state in ("queued", "running", "succeeded", "failed", "cancelled", "expired"):
            by_state.add_metric([state], jobs.counts.get(state, 0))
        age = GaugeMetricFamily("fullpower_jobs_oldest_queued_seconds", "Age of the oldest queued job")
        age.add_metric([], jobs.oldest_queued_s)
        return [by_state, age]

    return collect
