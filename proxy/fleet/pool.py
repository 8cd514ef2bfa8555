"""The workers of every pool and their state. The supervisor reports process events and the
request path reports request outcomes; this module is the only writer of worker state, and the
request path reads it to route.
"""

from __future__ import annotations

import enum
import time
from typing import Callable, Iterable

from backend.protocol import Heartbeat, Ready
from proxy.fleet import routing
from proxy.fleet.breaker import Breaker, BreakerPolicy
from proxy.fleet.worker_client import WorkerConnection


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    BACKOFF = "backing_off"
    STOPPED = "stopped"


class Outcome(str, enum.Enum):
    OK = "ok"
    GONE = "gone"  # connection lost or timed out: Envoy's "connect/reset/timeout" errors
    INTERNAL = "internal"  # the worker reported an internal error: a 5xx-equivalent


class Worker:
    """One replica slot of a pool: the process that currently fills it and its bookkeeping."""

    def __init__(self, worker_id: str, pool: str, model: str, device: str, capacity: int,
                 token_capacity: int = 1 << 30, breaker: Breaker | None = None) -> None:
        self.id = worker_id
        self.pool = pool
        self.model = model
        self.device = device
        self.capacity = capacity
        self.token_capacity = token_capacity
        self.breaker = breaker or Breaker(BreakerPolicy(), time.monotonic)
        self.state = WorkerState.STOPPED
        self.pid: int | None = None
        self.conn: WorkerConnection | None = None
        self.inflight = 0
        self.inflight_tokens = 0
        self.generation = 0  # bumped per process, so requests of a dead process release nothing
        self.restarts = 0
        self.boot_failures = 0
        self.backoff_s = 0.0  # the last restart delay
        self.last_error = ""
        self.last_heartbeat = 0.0
        self.engine_stall_s = 0.0
        self.engine_running = 0  # sequences the worker itself reports (last heartbeat)
        self.engine_waiting = 0
        self.generated_tokens = 0
        self.kv_slots = 0
        self.memory_bytes = 0
        self.gpu_memory_bytes = 0
        self.ready_since: float | None = None
        self.weight = 1.0
        self.info: Ready | None = None

    def snapshot(self, now: float) -> dict:
        return {
            "id": self.id, "pool": self.pool, "model": self.model, "device": self.device,
            "state": self.state.value, "pid": self.pid, "inflight": self.inflight,
            "capacity": self.capacity, "inflight_tokens": self.inflight_tokens,
            "engine_running": self.engine_running, "engine_waiting": self.engine_waiting,
            "kv_slots": self.kv_slots, "memory_bytes": self.memory_bytes, "gpu_memory_bytes": self.gpu_memory_bytes,
            "weight": round(self.weight, 3), "breaker": self.breaker.state,
            "times_ejected": self.breaker.times_ejected, "restarts": self.restarts,
            "boot_failures": self.boot_failures, "backoff_s": round(self.backoff_s, 3),
            "heartbeat_age_s": round(now - self.last_heartbeat, 3) if self.last_heartbeat else None,
            "ready_for_s": round(now - self.ready_since, 1) if self.ready_since else None,
            "last_error": self.last_error or None,
        }


class PoolState:
    def __init__(self, clock: Callable[[], float] = time.monotonic, slow_start_s: float = 0.0,
                 restart_after_ejections: int = 3) -> None:
        self.clock = clock
        self.slow_start_s = slow_start_s
        self.restart_after_ejections = restart_after_ejections
        self.workers: dict[str, Worker] = {}
        self.listeners: list[Callable[[str], None]] = []  # called with a pool name when capacity may have grown
        self.on_eject: Callable[[Worker], None] = lambda worker: None
        self.on_needs_restart: Callable[[Worker], None] = lambda worker: None

    def add(self, worker: Worker) -> None:
        self.workers[worker.id] = worker

    def remove(self, worker: Worker) -> None:
        self.workers.pop(worker.id, None)
        self._notify(worker.pool)

    def in_pool(self, pool: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool == pool]

    def ready(self, pool: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool == pool and w.state is WorkerState.READY]

    def any_ready(self) -> bool:
        return any(w.state is WorkerState.READY for w in self.workers.values())

    def capacity(self, pool: str) -> tuple[int, int]:
        """(requests, estimated tokens) the pool's ready workers can hold at once."""
        ready = self.ready(pool)
        return sum(w.capacity for w in ready), sum(w.token_capacity for w in ready)

    def pick(self, pool: str, exclude: Iterable[str] = ()) -> Worker | None:
        skip = set(exclude)
        ready = [w for w in self.ready(pool) if w.id not in skip]
        healthy = [w for w in ready if w.breaker.available()]
        if not healthy and ready:
            # Everything is ejected: still try the least-bad worker rather than refuse everyone.
            healthy = [min(ready, key=lambda w: (w.breaker.open_until, w.inflight))]
        now = self.clock()
        for w in healthy:
            w.weight = self._slow_start_weight(w, now)
        worker = routing.pick(healthy)
        if worker is not None:
            worker.breaker.on_dispatch()
        return worker

    def _slow_start_weight(self, worker: Worker, now: float) -> float:
        if not self.slow_start_s or worker.ready_since is None:
            return 1.0
        return min(1.0, 0.1 + 0.9 * (now - worker.ready_since) / self.slow_start_s)

    # --- transitions reported by the supervisor -------------------------------------------------
    def starting(self, worker: Worker, pid: int, conn: WorkerConnection) -> None:
        worker.state = WorkerState.STARTING
        worker.generation += 1
        worker.pid = pid
        worker.conn = conn
        worker.inflight = worker.inflight_tokens = 0
        worker.last_heartbeat = self.clock()
        worker.ready_since = None
        worker.info = None
        worker.breaker.reset()

    def became_ready(self, worker: Worker, info: Ready) -> None:
        worker.state = WorkerState.READY
        worker.info = info
        worker.ready_since = self.clock()
        worker.boot_failures = 0
        self._notify(worker.pool)

    def heartbeat(self, worker: Worker, hb: Heartbeat) -> None:
        worker.last_heartbeat = self.clock()
        worker.engine_stall_s = hb.engine_stall_s
        worker.engine_running = hb.running
        worker.engine_waiting = hb.waiting
        worker.generated_tokens = hb.generated_tokens
        worker.kv_slots = hb.kv_slots
        worker.memory_bytes = hb.memory_bytes
        worker.gpu_memory_bytes = hb.gpu_memory_bytes

    def draining(self, worker: Worker) -> None:
        if worker.state in (WorkerState.READY, WorkerState.STARTING):
            worker.state = WorkerState.DRAINING
            self._notify(worker.pool)

    def undrain(self, worker: Worker) -> None:
        if worker.state is WorkerState.DRAINING and worker.info is not None:
            worker.state = WorkerState.READY
            self._notify(worker.pool)

    def gone(self, worker: Worker, error: str, at_boot: bool, backoff_s: float = 0.0) -> None:
        worker.state = WorkerState.BACKOFF
        worker.backoff_s = backoff_s
        worker.pid = None
        worker.conn = None
        worker.ready_since = None
        worker.inflight = worker.inflight_tokens = 0
        worker.restarts += 1
        if at_boot:
            worker.boot_failures += 1
        if error:
            worker.last_error = error
        self._notify(worker.pool)

    def stopped(self, worker: Worker) -> None:
        worker.state = WorkerState.STOPPED
        worker.pid = None
        worker.conn = None
        worker.ready_since = None
        self._notify(worker.pool)

    # --- request accounting ---------------------------------------------------------------------
    def acquire(self, worker: Worker, cost: int) -> int:
        worker.inflight += 1
        worker.inflight_tokens += cost
        return worker.generation

    def release(self, worker: Worker, generation: int, cost: int, outcome: Outcome | None = None) -> None:
        if worker.generation == generation:
            if worker.inflight > 0:
                worker.inflight -= 1
                worker.inflight_tokens -= cost
            if outcome is not None:
                self._record(worker, outcome)
        self._notify(worker.pool)

    def _record(self, worker: Worker, outcome: Outcome) -> None:
        breaker = worker.breaker
        if outcome is Outcome.OK:
            breaker.record_success()
            return
        pool = self.in_pool(worker.pool)
        ejected = sum(1 for w in pool if w.breaker.ejected)
        may_eject = ejected + 1 <= len(pool) // 2  # never more than half the pool
        if breaker.record_failure(internal=outcome is Outcome.INTERNAL, may_eject=may_eject):
            self.on_eject(worker)
            if breaker.times_ejected >= self.restart_after_ejections:
                # Ejected again and again while its process lives: a restart, not another cool-off.
                self.on_needs_restart(worker)

    def _notify(self, pool: str) -> None:
        for listener in self.listeners:
            listener(pool)
