"""Spawns the workers, watches them and brings them back (in the manner of gunicorn's arbiter).

Each replica slot has one task running `_keep_alive`: spawn a fresh process (never a fork of this
one), wait for Ready, watch the three signs of trouble (process exit, missed heartbeats, a Fatal
frame or a stalled engine), stop what is left, back off with jitter, and start again. It never gives
up and never lets one failing slot affect the others.
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
from proxy.config import Config, Pool
from proxy.pool import PoolState, Worker, WorkerState
from proxy.worker_client import WorkerConnection

log = logging.getLogger("fullpower.supervisor")

HEALTHY_RESET_S = 60.0


def worker_settings(cfg: Config, pool: Pool, device: str) -> WorkerSettings:
    f = pool.fake
    return WorkerSettings(
        engine=pool.engine, model_name=pool.model, model_path=str(cfg.model_dir(pool)),
        device="cuda:0" if device.startswith("cuda") else "cpu", dtype=pool.dtype,
        max_batch_size=pool.max_batch_size, heartbeat_interval_s=cfg.workers.heartbeat_interval_s,
        verify_manifest=pool.verify_manifest, cpu_threads=pool.cpu_threads,
        fake_token_latency_ms=f.token_latency_ms, fake_prompt_latency_ms=f.prompt_latency_ms,
        fake_output_tokens=f.output_tokens, fake_context_length=f.context_length,
        fake_fail_every=f.fail_every, fake_hang_after=f.hang_after, fake_exit_after=f.exit_after,
        fake_boot_fail=f.boot_fail)


def worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    # Pin the worker to its GPU; a CPU worker sees none.
    env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] if device.startswith("cuda") else ""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Supervisor:
    def __init__(self, cfg: Config, pools: PoolState) -> None:
        self.cfg = cfg
        self.pools = pools
        self._tasks: dict[str, asyncio.Task] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False

    def start(self) -> None:
        for pool in self.cfg.pools:
            for index in range(pool.replicas.hot):
                worker = Worker(f"{pool.name}-{index}", pool.name, pool.model, pool.devices[index],
                                pool.max_inflight_per_worker, pool.max_tokens_inflight_per_worker)
                self.pools.add(worker)
                self._tasks[worker.id] = asyncio.create_task(self._keep_alive(worker, pool),
                                                             name=f"keep-alive {worker.id}")

    async def stop(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after the grace period. Leaves no process."""
        self._stopping = True
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        for worker in self.pools.workers.values():
            self.pools.stopped(worker)

    # --- one slot -------------------------------------------------------------------------------
    async def _keep_alive(self, worker: Worker, pool: Pool) -> None:
        w = self.cfg.workers
        backoff = w.restart_backoff_initial_s
        while not self._stopping:
            started = time.monotonic()
            error, at_boot = await self._run_once(worker, pool)
            if self._stopping:
                return
            lived = time.monotonic() - started
            if lived >= HEALTHY_RESET_S and not at_boot:
                backoff = w.restart_backoff_initial_s
            self.pools.gone(worker, error, at_boot)
            delay = backoff * random.uniform(0.8, 1.2)
            log.warning("worker %s %s (%s); restarting in %.1fs (restart %d)", worker.id,
                        "failed at boot" if at_boot else "stopped", error, delay, worker.restarts)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, w.restart_backoff_max_s)

    async def _run_once(self, worker: Worker, pool: Pool) -> tuple[str, bool]:
        """Run one process in this slot until it dies or must be stopped. Returns (why, at_boot)."""
        control: asyncio.Queue = asyncio.Queue()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = msgspec.json.encode(worker_settings(self.cfg, pool, worker.device)).decode()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backend", "--fd", str(child_sock.fileno()), "--settings", settings,
                "--worker-id", worker.id, pass_fds=[child_sock.fileno()], env=worker_env(worker.device),
                stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            parent_sock.close()
            return f"spawn failed: {exc}", True
        finally:
            child_sock.close()
        self._procs[worker.id] = proc
        try:
            conn = await WorkerConnection.attach(parent_sock, control.put_nowait)
            self.pools.starting(worker, proc.pid, conn)
            log.info("worker %s spawned (pid %d, %s)", worker.id, proc.pid, worker.device)
            return await self._watch(worker, proc, conn, control)
        finally:
            # Cancellation (shutdown) lands here too: the process must not outlive us.
            await self._terminate(worker, proc)
            parent_sock.close()
            self._procs.pop(worker.id, None)

    async def _watch(self, worker: Worker, proc, conn: WorkerConnection, control: asyncio.Queue) -> tuple[str, bool]:
        w = self.cfg.workers
        spawned = time.monotonic()
        hung_after = w.heartbeat_interval_s * w.missed_heartbeats
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                getter = asyncio.ensure_future(control.get())
                done, _ = await asyncio.wait({getter, exited}, timeout=w.heartbeat_interval_s / 2,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                ready = worker.state is WorkerState.READY
                if getter in done:
                    msg = getter.result()
                    if isinstance(msg, Heartbeat):
                        self.pools.heartbeat(worker, msg)
                    elif isinstance(msg, Ready):
                        log.info("worker %s ready (%s on %s) after %.1fs", worker.id, msg.model, msg.device,
                                 time.monotonic() - spawned)
                        self.pools.became_ready(worker, msg)
                    elif isinstance(msg, Fatal):
                        log.error("worker %s reported a fatal error: %s", worker.id, msg.message)
                        return msg.message, msg.at_boot
                    elif msg is None:
                        return f"connection closed (exit code {await _exit_code(proc)})", not ready
                if exited in done:
                    return f"exited with code {proc.returncode}", not ready
                now = time.monotonic()
                if now - worker.last_heartbeat > hung_after:
                    return f"no heartbeat for {now - worker.last_heartbeat:.1f}s (hung)", not ready
                if ready and worker.engine_stall_s > w.engine_stall_timeout_s:
                    return f"engine stalled for {worker.engine_stall_s:.0f}s", False
                if not ready and now - spawned > w.boot_timeout_s:
                    return f"not ready after {w.boot_timeout_s:.0f}s", True
        finally:
            exited.cancel()
            conn.close()

    async def _terminate(self, worker: Worker, proc) -> None:
        if proc.returncode is not None:
            return
        grace = self.cfg.workers.stop_grace_s
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return
            if sig is signal.SIGKILL:
                log.warning("worker %s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", worker.id, proc.pid, grace)
            try:
                await asyncio.shield(asyncio.wait_for(proc.wait(), wait))
                return
            except asyncio.TimeoutError:
                continue
            except asyncio.CancelledError:
                # Shutdown cancelled us mid-wait: still make sure the process dies.
                proc.kill()
                await proc.wait()
                raise


async def _exit_code(proc) -> int | None:
    try:
        return await asyncio.wait_for(proc.wait(), 2.0)
    except asyncio.TimeoutError:
        return None
