"""Spawns the workers, watches them and brings them back (in the manner of gunicorn's arbiter).

Every replica slot (hot or cold) has a Worker in PoolState; a running slot has one task running
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
import socket
import sys
import time

import msgspec

from backend.protocol import Fatal, Heartbeat, Ready, WorkerSettings
from proxy.fleet.breaker import Breaker, BreakerPolicy
from proxy.config import Config, Pool
from proxy.fleet.pool import PoolState, Worker, WorkerState
from proxy.fleet.worker_client import WorkerConnection

log = logging.getLogger("fullpower.supervisor")

HEALTHY_RESET_S = 60.0


def worker_settings(cfg: Config, pool: Pool, device: str) -> WorkerSettings:
    f = pool.fake
    return WorkerSettings(
        engine=pool.engine, model_name=pool.model, model_path=str(cfg.model_dir(pool)),
        device="cuda:0" if device.startswith("cuda") else "cpu", dtype=pool.dtype,
        max_batch_size=pool.max_batch_size, heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
        verify_manifest=pool.verify_manifest, cpu_threads=pool.cpu_threads, max_context=pool.max_context,
        kv_cache_fraction=pool.kv_cache_fraction, cuda_graphs=pool.cuda_graphs,
        fake_token_latency_ms=f.token_latency_ms, fake_prompt_latency_ms=f.prompt_latency_ms,
        fake_output_tokens=f.output_tokens, fake_context_length=f.context_length,
        fake_fail_every=f.fail_every, fake_hang_after=f.hang_after, fake_exit_after=f.exit_after,
        fake_boot_fail=f.boot_fail, fake_boot_delay_ms=f.boot_delay_ms)


def worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    # Pin the worker to its GPU; a CPU worker sees none.
    env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] if device.startswith("cuda") else ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _process_settings(pool: Pool) -> tuple:
    """The pool settings a running worker process was started with (changing them needs a restart)."""
    return (pool.engine, pool.model, pool.model_path, pool.dtype, pool.max_batch_size, pool.cpu_threads,
            pool.max_context, pool.kv_cache_fraction, pool.cuda_graphs, pool.verify_manifest,
            msgspec.structs.astuple(pool.fake))


class Slot:
    def __init__(self, worker: Worker, pool: Pool, cold: bool) -> None:
        self.worker = worker
        self.pool = pool
        self.cold = cold
        self.task: asyncio.Task | None = None
        self.restart = asyncio.Event()
        self.idle_since: float | None = None


class Supervisor:
    def __init__(self, cfg: Config, pools: PoolState, metrics=None) -> None:
        self.cfg = cfg
        self.pools = pools
        self.metrics = metrics
        self.slots: dict[str, Slot] = {}
        self._stopping = False
        self._scaler: asyncio.Task | None = None
        self._deep_since: dict[str, float] = {}
        self.queue_depth = lambda pool: 0  # set by the composition root (reads admission)
        pools.on_needs_restart = self._restart_unhealthy
        pools.on_eject = self._ejected

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        for pool in self.cfg.pools:
            self._add_slots(pool)
        self._scaler = asyncio.create_task(self._autoscale(), name="autoscale")

    async def stop(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after the grace period. Leaves no process."""
        self._stopping = True
        if self._scaler is not None:
            self._scaler.cancel()
        tasks = [s.task for s in self.slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self.slots.values():
            slot.task = None
            self.pools.stopped(slot.worker)

    # --- slots ----------------------------------------------------------------------------------
    def _new_worker(self, pool: Pool, index: int) -> Worker:
        o = self.cfg.outlier
        breaker = Breaker(BreakerPolicy(o.consecutive_errors, o.consecutive_5xx, o.base_eject_s, o.max_eject_s),
                          time.monotonic)
        return Worker(f"{pool.name}-{index}", pool.name, pool.model, pool.devices[index],
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
        deadline = time.monotonic() + drain_s
        while worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
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
            deadline = time.monotonic() + (self.cfg.timeouts.drain_s if drain_s is None else drain_s)
            while worker.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            generation = worker.generation
            slot.restart.set()
            while worker.generation == generation:
                await asyncio.sleep(0.05)
        if wait_ready:
            await self._wait_ready(worker)

    async def rolling_restart(self, pool: str) -> list[str]:
        """Restart every running worker of the pool, one at a time (at most one out at once)."""
        done = []
        for slot in list(self.running(pool)):
            await self.restart_worker(slot.worker.id)
            done.append(slot.worker.id)
        return done

    async def _wait_ready(self, worker: Worker) -> None:
        deadline = time.monotonic() + self.cfg.workers.boot_timeout_s
        while worker.state is not WorkerState.READY:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {worker.id} not ready after {self.cfg.workers.boot_timeout_s:.0f}s")
            await asyncio.sleep(0.05)

    def _restart_unhealthy(self, worker: Worker) -> None:
        slot = self.slots.get(worker.id)
        if slot is not None and slot.task is not None:
            log.warning("worker %s keeps failing while alive (ejected %d times): restarting it", worker.id,
                        worker.breaker.times_ejected)
            worker.last_error = f"restarted after {worker.breaker.times_ejected} ejections"
            slot.restart.set()

    def _ejected(self, worker: Worker) -> None:
        log.warning("worker %s ejected for %.0fs (ejection %d)", worker.id,
                    worker.breaker.open_until - time.monotonic(), worker.breaker.times_ejected)
        if self.metrics is not None:
            self.metrics.ejections.labels(worker.pool).inc()

    # --- reload ---------------------------------------------------------------------------------
    async def apply(self, new: Config) -> list[str]:
        """Bring the running slots in line with a new config without dropping in-flight requests.
        Returns what changed, one line each."""
        old = {p.name: p for p in self.cfg.pools}
        self.cfg = new
        changes: list[str] = []
        for pool in new.pools:
            prev = old.pop(pool.name, None)
            if prev is None:
                self._add_slots(pool)
                changes.append(f"pool {pool.name}: added ({pool.replicas.hot} hot)")
                continue
            restart = _process_settings(prev) != _process_settings(pool) or prev.devices != pool.devices
            if restart:
                # Different process settings: replace the slots one by one (rolling).
                for slot in [s for s in self.slots.values() if s.pool.name == pool.name]:
                    await self._stop_slot(slot, new.timeouts.drain_s)
                    self.pools.remove(slot.worker)
                    del self.slots[slot.worker.id]
                self._add_slots(pool)
                changes.append(f"pool {pool.name}: workers replaced (process settings changed)")
                continue
            for slot in [s for s in self.slots.values() if s.pool.name == pool.name]:
                slot.pool = pool
                slot.worker.capacity = pool.max_inflight_per_worker
                slot.worker.token_capacity = pool.max_tokens_inflight_per_worker
            changes += await self._resize(pool)
        for gone in old.values():
            for slot in [s for s in self.slots.values() if s.pool.name == gone.name]:
                await self._stop_slot(slot, new.timeouts.drain_s)
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
                await self._stop_slot(slot, self.cfg.timeouts.drain_s)
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
            for pool in self.cfg.pools:
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
                asyncio.create_task(self._stop_slot(slot, self.cfg.timeouts.drain_s))
                self._scaled(pool.name, "down")

    def _scaled(self, pool: str, direction: str) -> None:
        if self.metrics is not None:
            self.metrics.scaling_events.labels(pool, direction).inc()

    # --- one slot -------------------------------------------------------------------------------
    async def _keep_alive(self, slot: Slot) -> None:
        worker, w = slot.worker, self.cfg.workers
        backoff = w.restart_backoff_initial_s
        while not self._stopping:
            started = time.monotonic()
            error, at_boot, requested = await self._run_once(slot)
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

    async def _run_once(self, slot: Slot) -> tuple[str, bool, bool]:
        """Run one process in this slot until it dies or must be stopped.
        Returns (why, failed at boot, restart requested)."""
        worker = slot.worker
        control: asyncio.Queue = asyncio.Queue()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = msgspec.json.encode(worker_settings(self.cfg, slot.pool, worker.device)).decode()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backend", "--fd", str(child_sock.fileno()), "--settings", settings,
                "--worker-id", worker.id, pass_fds=[child_sock.fileno()], env=worker_env(worker.device),
                stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            parent_sock.close()
            return f"spawn failed: {exc}", True, False
        finally:
            child_sock.close()
        try:
            conn = await WorkerConnection.attach(parent_sock, control.put_nowait)
            self.pools.starting(worker, proc.pid, conn)
            log.info("worker %s spawned (pid %d, %s)", worker.id, proc.pid, worker.device)
            return await self._watch(slot, proc, conn, control)
        finally:
            # Cancellation (shutdown) lands here too: the process must not outlive us.
            await self._terminate(worker, proc)
            parent_sock.close()

    async def _watch(self, slot: Slot, proc, conn: WorkerConnection,
                     control: asyncio.Queue) -> tuple[str, bool, bool]:
        worker, w = slot.worker, self.cfg.workers
        spawned = time.monotonic()
        hung_after = w.heartbeat_interval_s * w.missed_heartbeats
        exited = asyncio.ensure_future(proc.wait())
        restart = asyncio.ensure_future(slot.restart.wait())
        ready = False
        try:
            while True:
                getter = asyncio.ensure_future(control.get())
                done, _ = await asyncio.wait({getter, exited, restart}, timeout=w.heartbeat_interval_s / 2,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                else:
                    msg = getter.result()
                    if isinstance(msg, Heartbeat):
                        self.pools.heartbeat(worker, msg)
                    elif isinstance(msg, Ready):
                        ready = True
                        log.info("worker %s ready (%s on %s) after %.1fs", worker.id, msg.model, msg.device,
                                 time.monotonic() - spawned)
                        self.pools.became_ready(worker, msg)
                    elif isinstance(msg, Fatal):
                        log.error("worker %s reported a fatal error: %s", worker.id, msg.message)
                        return msg.message, msg.at_boot, False
                    elif msg is None:
                        return f"connection closed (exit code {await _exit_code(proc)})", not ready, False
                if restart in done:
                    slot.restart.clear()
                    return "restart requested", False, True
                if exited in done:
                    return f"exited with code {proc.returncode}", not ready, False
                now = time.monotonic()
                if now - worker.last_heartbeat > hung_after:
                    return f"no heartbeat for {now - worker.last_heartbeat:.1f}s (hung)", not ready, False
                if ready and worker.engine_stall_s > w.engine_stall_timeout_s:
                    return f"engine stalled for {worker.engine_stall_s:.0f}s", False, False
                if not ready and now - spawned > w.boot_timeout_s:
                    return f"not ready after {w.boot_timeout_s:.0f}s", True, False
        finally:
            exited.cancel()
            restart.cancel()
            # Closing the connection fails the worker's open requests at once, so they fail over
            # now rather than after the process is gone.
            conn.close()

    async def _terminate(self, worker: Worker, proc) -> None:
        if proc.returncode is not None:
            return
        grace = self.cfg.workers.stop_grace_s
        try:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process must run to see SIGTERM
        except ProcessLookupError:
            return
        try:
            await asyncio.shield(asyncio.wait_for(proc.wait(), grace))
            return
        except asyncio.TimeoutError:
            log.warning("worker %s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", worker.id, proc.pid, grace)
        except asyncio.CancelledError:
            # Shutdown cancelled us mid-wait: still make sure the process dies.
            proc.kill()
            await proc.wait()
            raise
        try:
            proc.kill()
        except ProcessLookupError:
            return
        await asyncio.shield(proc.wait())


async def _exit_code(proc) -> int | None:
    try:
        return await asyncio.wait_for(proc.wait(), 2.0)
    except asyncio.TimeoutError:
        return None
