"""Spawns the workers, watches them and brings them back (in the manner of gunicorn's arbiter).

Every replica slot (hot or cold) has a Replica in PoolState; a running slot has one task running
`_keep_alive`: spawn a fresh process (never a fork of this one), wait for Ready, watch the signs of
trouble (process exit, missed heartbeats, a Fatal frame, a stalled engine, a restart request), stop
what is left, back off with jitter, and start again. It never gives up and never lets one failing
slot affect the others. The verbs an operator uses - drain, restart, rolling restart, scale, apply
a new config - are methods here too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable

import msgspec

from proxy.config import Outlier, Pool, Workers
from proxy.fleet.breaker import Breaker, BreakerPolicy
from proxy.fleet.pool import Ejection, PoolState, Replica, WorkerState
from proxy.fleet.process import run_process

log = logging.getLogger("fullpower.supervisor")

HEALTHY_RESET_S = 60.0


def _process_settings(pool: Pool) -> tuple:
    """The pool settings a running worker process was started with (changing them needs a restart)."""
    return (pool.engine, pool.model, pool.model_path, pool.dtype, pool.max_batch_size, pool.cpu_threads,
            pool.max_context, pool.kv_cache_fraction, pool.cuda_graphs, pool.prefill_budget_tokens, pool.prefill_wait_ms,
            pool.overlap_prefill, pool.stream_interval, pool.verify_manifest,
            msgspec.structs.astuple(pool.fake))


class Slot:
    """One replica slot: its config, whether it is cold standby, and the task keeping it alive."""

    def __init__(self, worker: Replica, pool: Pool, cold: bool) -> None:
        self.worker = worker
        self.pool = pool
        self.cold = cold
        self.task: asyncio.Task | None = None
        self.restart = asyncio.Event()
        self.idle_since: float | None = None


class Supervisor:
    """Owns the `pools` (process side), `workers` and `outlier` sections and every slot's task."""

    def __init__(self, pools: PoolState, pool_settings: list[Pool], workers: Workers, outlier: Outlier,
                 drain_s: float, data_dir: Path, queue_depth: Callable[[str], int], metrics=None) -> None:
        self.pools = pools
        self.data_dir = data_dir
        self.queue_depth = queue_depth  # pool -> requests waiting for admission (the cold-standby signal)
        self.metrics = metrics
        self.pool_settings, self.workers, self.outlier, self.drain_s = pool_settings, workers, outlier, drain_s
        self.slots: dict[str, Slot] = {}
        self._stopping = False
        # Set before stop() to leave the worker processes running for the next proxy to adopt
        # (a hand-over restart, SIGUSR2) instead of stopping them.
        self.hand_over = False
        self._scaler: asyncio.Task | None = None
        self._scale_downs: set[asyncio.Task] = set()
        self._deep_since: dict[str, float] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        for pool in self.pool_settings:
            self._add_slots(pool)
        self._scaler = asyncio.create_task(self._autoscale(), name="autoscale")

    async def stop(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after the grace period. Leaves no process -
        unless handing over, when the processes stay up (models loaded) for the next proxy."""
        self._stopping = True
        background = [t for t in (self._scaler, *self._scale_downs) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        tasks = [s.task for s in self.slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self.slots.values():
            slot.task = None
            self.pools.stopped(slot.worker)

    # --- slots ----------------------------------------------------------------------------------
    def _new_worker(self, pool: Pool, index: int) -> Replica:
        o = self.outlier
        breaker = Breaker(BreakerPolicy(o.consecutive_errors, o.consecutive_5xx, o.base_eject_s, o.max_eject_s),
                          time.monotonic)
        return Replica(f"{pool.name}-{index}", pool.name, pool.model, pool.devices[index],
                      pool.max_inflight_per_worker, pool.max_tokens_inflight_per_worker, breaker)

    def _add_slots(self, pool: Pool) -> None:
        for index in range(pool.replicas.hot + pool.replicas.cold):
            worker = self._new_worker(pool, index)
            if worker.id in self.slots:
                continue
            slot = self.slots[worker.id] = Slot(worker, pool, cold=index >= pool.replicas.hot)
            self.pools.add(worker)
            if not slot.cold:
                self._run(slot)

    def _run(self, slot: Slot) -> None:
        slot.restart.clear()
        slot.idle_since = None
        slot.task = asyncio.create_task(self._keep_alive(slot), name=f"keep-alive {slot.worker.id}")

    def running(self, pool: str) -> list[Slot]:
        return [s for s in self.slots.values() if s.pool.name == pool and s.task is not None]

    async def _stop_slot(self, slot: Slot, drain_s: float) -> None:
        """Drain (no new requests; in-flight ones get `drain_s`), then stop the process."""
        worker = slot.worker
        self.pools.draining(worker)
        await self.pools.wait_for(lambda: not worker.inflight, drain_s)
        if slot.task is not None:
            slot.task.cancel()
            await asyncio.gather(slot.task, return_exceptions=True)
            slot.task = None
        self.pools.stopped(worker)

    # --- operator verbs -------------------------------------------------------------------------
    def slot(self, worker_id: str) -> Slot:
        try:
            return self.slots[worker_id]
        except KeyError:
            raise LookupError(f"no worker {worker_id!r}") from None

    def drain(self, worker_id: str) -> None:
        self.pools.draining(self.slot(worker_id).worker)

    def kill(self, worker_id: str) -> None:
        """SIGKILL the worker's process, as a crash would (chaos testing); the slot restarts it."""
        pid = self.slot(worker_id).worker.pid
        if pid is None:
            raise LookupError(f"worker {worker_id!r} has no running process")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def undrain(self, worker_id: str) -> None:
        self.pools.undrain(self.slot(worker_id).worker)

    async def restart_worker(self, worker_id: str, drain_s: float | None = None, wait_ready: bool = True) -> None:
        """Drain one worker, replace its process, and (by default) wait until the new one is ready."""
        slot = self.slot(worker_id)
        worker = slot.worker
        if slot.task is None:
            self._run(slot)
        else:
            self.pools.draining(worker)
            await self.pools.wait_for(lambda: not worker.inflight, self.drain_s if drain_s is None else drain_s)
            epoch = worker.process_epoch
            slot.restart.set()
            await self.pools.wait_for(lambda: worker.process_epoch != epoch, float("inf"))
        if wait_ready:
            await self._wait_ready(worker)

    async def rolling_restart(self, pool: str) -> list[str]:
        """Restart every running worker of the pool, one at a time (at most one out at once)."""
        done = []
        for slot in list(self.running(pool)):
            await self.restart_worker(slot.worker.id)
            done.append(slot.worker.id)
        return done

    async def _wait_ready(self, worker: Replica) -> None:
        boot_s = self.workers.boot_timeout_s
        if not await self.pools.wait_for(lambda: worker.state is WorkerState.READY, boot_s):
            raise TimeoutError(f"worker {worker.id} not ready after {boot_s:.0f}s")

    def handle_ejection(self, ejection: Ejection) -> None:
        """What PoolState decided after a failure on the request path: log and count the ejection,
        and replace the process of a worker ejected again and again while alive."""
        worker = ejection.replica
        log.warning("worker %s ejected for %.0fs (ejection %d)", worker.id,
                    worker.breaker.open_until - time.monotonic(), worker.breaker.times_ejected)
        if self.metrics is not None:
            self.metrics.ejections.labels(worker.pool).inc()
        slot = self.slots.get(worker.id)
        if ejection.restart and slot is not None and slot.task is not None:
            log.warning("worker %s keeps failing while alive (ejected %d times): restarting it", worker.id,
                        worker.breaker.times_ejected)
            self.pools.restart_requested(worker, f"restarted after {worker.breaker.times_ejected} ejections")
            slot.restart.set()

    # --- reload ---------------------------------------------------------------------------------
    async def apply(self, pool_settings: list[Pool], workers: Workers, outlier: Outlier, drain_s: float) -> list[str]:
        """Bring the running slots in line with new settings without dropping in-flight requests.
        Returns what changed, one line each."""
        old = {p.name: p for p in self.pool_settings}
        self.pool_settings, self.workers, self.outlier, self.drain_s = pool_settings, workers, outlier, drain_s
        changes: list[str] = []
        for pool in pool_settings:
            prev = old.pop(pool.name, None)
            if prev is None:
                self._add_slots(pool)
                changes.append(f"pool {pool.name}: added ({pool.replicas.hot} hot)")
                continue
            restart = _process_settings(prev) != _process_settings(pool) or prev.devices != pool.devices
            if restart:
                # Different process settings: replace the slots one by one (rolling).
                for slot in [s for s in self.slots.values() if s.pool.name == pool.name]:
                    await self._stop_slot(slot, drain_s)
                    self.pools.remove(slot.worker)
                    del self.slots[slot.worker.id]
                self._add_slots(pool)
                changes.append(f"pool {pool.name}: workers replaced (process settings changed)")
                continue
            for slot in [s for s in self.slots.values() if s.pool.name == pool.name]:
                slot.pool = pool
                self.pools.set_limits(slot.worker, pool.max_inflight_per_worker, pool.max_tokens_inflight_per_worker)
            changes += await self._resize(pool)
        for gone in old.values():
            for slot in [s for s in self.slots.values() if s.pool.name == gone.name]:
                await self._stop_slot(slot, drain_s)
                self.pools.remove(slot.worker)
                del self.slots[slot.worker.id]
            changes.append(f"pool {gone.name}: removed")
        return changes

    async def _resize(self, pool: Pool) -> list[str]:
        wanted = pool.replicas.hot + pool.replicas.cold
        slots = sorted((s for s in self.slots.values() if s.pool.name == pool.name),
                       key=lambda s: int(s.worker.id.rsplit("-", 1)[1]))
        changes = []
        for index, slot in enumerate(slots):
            slot.cold = index >= pool.replicas.hot
            if index >= wanted:
                await self._stop_slot(slot, self.drain_s)
                self.pools.remove(slot.worker)
                del self.slots[slot.worker.id]
                changes.append(f"pool {pool.name}: removed {slot.worker.id}")
            elif not slot.cold and slot.task is None:
                self._run(slot)
                changes.append(f"pool {pool.name}: started {slot.worker.id}")
        if len(slots) < wanted:
            before = set(self.slots)
            self._add_slots(pool)
            changes += [f"pool {pool.name}: added {w}" for w in sorted(set(self.slots) - before)]
        return changes

    # --- cold standby ---------------------------------------------------------------------------
    async def _autoscale(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for pool in self.pool_settings:
                try:
                    self._scale_pool(pool, now)
                except Exception:  # noqa: BLE001 - the scaler must outlive a bad decision
                    log.exception("autoscaler failed for pool %s", pool.name)

    def _scale_pool(self, pool: Pool, now: float) -> None:
        a = pool.autoscale
        depth = self.queue_depth(pool.name)
        cold = [s for s in self.slots.values() if s.pool.name == pool.name and s.cold]
        if depth >= a.queue_depth:
            since = self._deep_since.setdefault(pool.name, now)
            parked = [s for s in cold if s.task is None]
            if parked and now - since >= a.sustain_s:
                slot = parked[0]
                log.info("pool %s: queue depth %d for %.0fs: starting cold worker %s", pool.name, depth,
                         now - since, slot.worker.id)
                self._run(slot)
                self._deep_since[pool.name] = now  # one more per sustained period
                self._scaled(pool.name, "up")
        else:
            self._deep_since.pop(pool.name, None)
        for slot in cold:
            if slot.task is None or slot.worker.state is not WorkerState.READY:
                continue
            if slot.worker.inflight or depth:
                slot.idle_since = None
            elif slot.idle_since is None:
                slot.idle_since = now
            elif now - slot.idle_since >= a.idle_s:
                log.info("pool %s: cold worker %s idle for %.0fs: stopping it", pool.name, slot.worker.id,
                         now - slot.idle_since)
                slot.idle_since = None
                task = asyncio.create_task(self._stop_slot(slot, self.drain_s), name=f"scale down {slot.worker.id}")
                self._scale_downs.add(task)
                task.add_done_callback(self._scale_downs.discard)
                self._scaled(pool.name, "down")

    def _scaled(self, pool: str, direction: str) -> None:
        if self.metrics is not None:
            self.metrics.scaling_events.labels(pool, direction).inc()

    # --- one slot -------------------------------------------------------------------------------
    async def _keep_alive(self, slot: Slot) -> None:
        worker, w = slot.worker, self.workers
        backoff = w.restart_backoff_initial_s
        while not self._stopping:
            started = time.monotonic()
            error, at_boot, requested = await run_process(self.pools, worker, slot.pool, self.workers, self.data_dir,
                                                          slot.restart, lambda: self.hand_over)
            w = self.workers  # a reload may have changed the backoff settings meanwhile
            if self._stopping:
                return
            if time.monotonic() - started >= HEALTHY_RESET_S and not at_boot:
                backoff = w.restart_backoff_initial_s
            delay = 0.0 if requested else backoff * random.uniform(0.8, 1.2)
            self.pools.gone(worker, error, at_boot, delay)
            if requested:
                log.info("worker %s restarting (%s)", worker.id, error)
                continue
            log.warning("worker %s %s (%s); restarting in %.1fs (restart %d)", worker.id,
                        "failed at boot" if at_boot else "stopped", error, delay, worker.restarts)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, w.restart_backoff_max_s)
