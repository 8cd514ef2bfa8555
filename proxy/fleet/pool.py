"""The workers of every pool and their state. The supervisor reports process events and the
request path reports request outcomes; this module is the only writer of worker state, and the
request path reads it to route. Methods return what others must do (an Ejection for the
supervisor) rather than calling out; the one push is the pool's capacity, handed to the admission
gate whenever it may have changed, and an event that async waiters (drain, restart, wait for
ready) wait on instead of polling.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Ejection:
    """PoolState's verdict after a failure: the worker was ejected; `restart` when it has been
    ejected so often while alive that its process should be replaced."""

    replica: "Replica"
    restart: bool


class Replica:
    """One replica slot of a pool as the request path sees it: the process that currently fills it
    (if any) and its bookkeeping. (backend.worker.Worker is the process itself.)"""

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
        self.process_epoch = 0  # bumped per process, so requests of a dead process release nothing
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
        self.weight_bytes = 0
        self.host_seconds: dict[str, float] = {}  # the engine loop's host time by part (its report)
        self.decode_steps = 0
        self.ready_since: float | None = None
        self.weight = 1.0
        self.info: Ready | None = None
        self.adopted = False  # the process was running before this proxy started (kept its model)
        self.process_started_at: float | None = None  # time.time() the process started (its Hello)

    def snapshot(self, now: float) -> dict:
        return {
            "id": self.id, "pool": self.pool, "model": self.model, "device": self.device,
            "state": self.state.value, "pid": self.pid, "inflight": self.inflight,
            "capacity": self.capacity, "inflight_tokens": self.inflight_tokens,
            "engine_running": self.engine_running, "engine_waiting": self.engine_waiting,
            "kv_slots": self.kv_slots, "memory_bytes": self.memory_bytes, "gpu_memory_bytes": self.gpu_memory_bytes,
            "weight_bytes": self.weight_bytes, "weight": round(self.weight, 3), "breaker": self.breaker.state,
            "times_ejected": self.breaker.times_ejected, "restarts": self.restarts,
            "boot_failures": self.boot_failures, "backoff_s": round(self.backoff_s, 3),
            "heartbeat_age_s": round(now - self.last_heartbeat, 3) if self.last_heartbeat else None,
            "ready_for_s": round(now - self.ready_since, 1) if self.ready_since else None,
            "last_error": self.last_error or None, "adopted": self.adopted,
            "age_s": round(time.time() - self.process_started_at, 1) if self.process_started_at else None,
        }


class PoolState:
    def __init__(self, clock: Callable[[], float] = time.monotonic, slow_start_s: float = 0.0,
                 restart_after_ejections: int = 3,
                 on_capacity: Callable[[str, int, int], None] = lambda pool, requests, tokens: None) -> None:
        self.clock = clock
        self.slow_start_s = slow_start_s
        self.restart_after_ejections = restart_after_ejections
        self.workers: dict[str, Replica] = {}
        self._on_capacity = on_capacity  # (pool, requests, tokens) whenever the pool's capacity may have changed
        self._changed = asyncio.Event()
        # pool -> its READY workers, asked several times per request; dropped on every change of a
        # worker's state or of the set of workers (all of which happen in this class)
        self._ready: dict[str, list[Replica]] = {}

    def reconfigure(self, slow_start_s: float, restart_after_ejections: int) -> None:
        """Take reloaded `routing.slow_start_s` and `outlier.restart_after_ejections`."""
        self.slow_start_s = slow_start_s
        self.restart_after_ejections = restart_after_ejections
        if not slow_start_s:
            for worker in self.workers.values():
                worker.weight = 1.0  # pick() only sets weights while slow start is on

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (checked after every state change), at most `timeout` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                return False
            changed = self._changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                return predicate()
        return True

    def add(self, worker: Replica) -> None:
        self.workers[worker.id] = worker
        self._ready.clear()

    def remove(self, worker: Replica) -> None:
        self.workers.pop(worker.id, None)
        self._notify(worker.pool)

    def in_pool(self, pool: str) -> list[Replica]:
        return [w for w in self.workers.values() if w.pool == pool]

    def ready(self, pool: str) -> list[Replica]:
        """The pool's READY workers (callers must not change the list)."""
        found = self._ready.get(pool)
        if found is None:
            found = self._ready[pool] = [w for w in self.workers.values()
                                         if w.pool == pool and w.state is WorkerState.READY]
        return found

    def any_ready(self) -> bool:
        return any(w.state is WorkerState.READY for w in self.workers.values())

    def context_length(self, pool: str) -> int | None:
        """The longest sequence (prompt + output) every ready worker of the pool can hold."""
        lengths = [w.info.context_length for w in self.ready(pool) if w.info is not None]
        return min(lengths) if lengths else None

    def capacity(self, pool: str) -> tuple[int, int]:
        """(requests, estimated tokens) the pool's ready workers can hold at once."""
        ready = self.ready(pool)
        return sum(w.capacity for w in ready), sum(w.token_capacity for w in ready)

    def pick(self, pool: str, exclude: Iterable[str] = ()) -> Replica | None:
        ready = self.ready(pool)
        if exclude:
            skip = set(exclude)
            ready = [w for w in ready if w.id not in skip]
        healthy = [w for w in ready if w.breaker.available()]
        if not healthy and ready:
            # Everything is ejected: still try the least-bad worker rather than refuse everyone.
            healthy = [min(ready, key=lambda w: (w.breaker.open_until, w.inflight))]
        if self.slow_start_s:
            now = self.clock()
            for w in healthy:
                w.weight = self._slow_start_weight(w, now)
        worker = routing.pick(healthy)
        if worker is not None:
            worker.breaker.on_dispatch()
        return worker

    def _slow_start_weight(self, worker: Replica, now: float) -> float:
        if not self.slow_start_s or worker.ready_since is None:
            return 1.0
        return min(1.0, 0.1 + 0.9 * (now - worker.ready_since) / self.slow_start_s)

    # --- transitions reported by the supervisor -------------------------------------------------
    def starting(self, worker: Replica, pid: int | None, conn: WorkerConnection | None) -> None:
        """A process is about to fill the slot (adopted or spawned: `connected` says which)."""
        worker.adopted, worker.process_started_at = False, None
        worker.state = WorkerState.STARTING
        self._ready.clear()
        worker.process_epoch += 1
        worker.pid = pid
        worker.conn = conn
        worker.inflight = worker.inflight_tokens = 0
        worker.last_heartbeat = self.clock()
        worker.ready_since = None
        worker.info = None
        worker.breaker.reset()

    def connected(self, worker: Replica, conn: WorkerConnection, pid: int, started_at: float,
                  adopted: bool) -> None:
        """The slot's process answers on its socket: spawned by this proxy, or adopted (running
        before it, model loaded)."""
        worker.conn, worker.pid = conn, pid
        worker.process_started_at, worker.adopted = started_at, adopted

    def became_ready(self, worker: Replica, info: Ready) -> None:
        worker.state = WorkerState.READY
        worker.info = info
        worker.ready_since = self.clock()
        worker.boot_failures = 0
        self._notify(worker.pool)

    def heartbeat(self, worker: Replica, hb: Heartbeat) -> None:
        worker.last_heartbeat = self.clock()
        worker.engine_stall_s = hb.engine_stall_s
        worker.engine_running = hb.running
        worker.engine_waiting = hb.waiting
        worker.generated_tokens = hb.generated_tokens
        worker.kv_slots = hb.kv_slots
        worker.memory_bytes = hb.memory_bytes
        worker.gpu_memory_bytes = hb.gpu_memory_bytes
        worker.weight_bytes = hb.weight_bytes
        worker.host_seconds = hb.host_seconds
        worker.decode_steps = hb.decode_steps

    def draining(self, worker: Replica) -> None:
        if worker.state in (WorkerState.READY, WorkerState.STARTING):
            worker.state = WorkerState.DRAINING
            self._notify(worker.pool)

    def undrain(self, worker: Replica) -> None:
        if worker.state is WorkerState.DRAINING and worker.info is not None:
            worker.state = WorkerState.READY
            self._notify(worker.pool)

    def gone(self, worker: Replica, error: str, at_boot: bool, backoff_s: float = 0.0) -> None:
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

    def stopped(self, worker: Replica) -> None:
        worker.state = WorkerState.STOPPED
        worker.pid = None
        worker.conn = None
        worker.ready_since = None
        self._notify(worker.pool)

    # --- request accounting ---------------------------------------------------------------------
    def acquire(self, worker: Replica, cost: int) -> int:
        """Count a request on the worker; returns the process epoch to release it against."""
        worker.inflight += 1
        worker.inflight_tokens += cost
        return worker.process_epoch

    def release(self, worker: Replica, epoch: int, cost: int, outcome: Outcome | None = None) -> Ejection | None:
        verdict = None
        if worker.process_epoch == epoch:
            if worker.inflight > 0:
                worker.inflight -= 1
                worker.inflight_tokens -= cost
            if outcome is not None:
                verdict = self._record(worker, outcome)
        self._notify(worker.pool, states_changed=False)
        return verdict

    def _record(self, worker: Replica, outcome: Outcome) -> Ejection | None:
        breaker = worker.breaker
        if outcome is Outcome.OK:
            breaker.record_success()
            return None
        pool = self.in_pool(worker.pool)
        ejected = sum(1 for w in pool if w.breaker.ejected)
        may_eject = ejected + 1 <= len(pool) // 2  # never more than half the pool
        if breaker.record_failure(internal=outcome is Outcome.INTERNAL, may_eject=may_eject):
            # Ejected again and again while its process lives: a restart, not another cool-off.
            return Ejection(worker, restart=breaker.times_ejected >= self.restart_after_ejections)
        return None

    # --- settings and requests from the supervisor ----------------------------------------------
    def set_limits(self, worker: Replica, capacity: int, token_capacity: int) -> None:
        worker.capacity, worker.token_capacity = capacity, token_capacity
        self._notify(worker.pool, states_changed=False)

    def restart_requested(self, worker: Replica, why: str) -> None:
        worker.last_error = why

    def _notify(self, pool: str, states_changed: bool = True) -> None:
        if states_changed:
            self._ready.clear()
        requests, tokens = self.capacity(pool)
        self._on_capacity(pool, requests, tokens)
        self._changed.set()
        self._changed = asyncio.Event()
