"""One worker process from spawn to exit: its settings and environment, the watch for signs of
trouble (exit, missed heartbeats, a Fatal frame, a stalled engine, a restart request), a stack dump
when it hung, and a stop that always ends the process (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import msgspec

from backend.protocol import STACK_DUMP_SIGNAL, Fatal, Heartbeat, Ready, WorkerSettings
from proxy.config import Pool, Workers, model_dir
from proxy.fleet.pool import PoolState, Replica
from proxy.fleet.worker_client import WorkerConnection

log = logging.getLogger("fullpower.supervisor")
STACK_DUMP_WAIT_S = 1.0  # time a hung worker gets to write its stack before SIGTERM


def worker_settings(pool: Pool, workers: Workers, data_dir: Path, device: str) -> WorkerSettings:
    f = pool.fake
    return WorkerSettings(
        engine=pool.engine, model_name=pool.model, model_path=str(model_dir(pool, data_dir)),
        device="cuda:0" if device.startswith("cuda") else "cpu", dtype=pool.dtype,
        max_batch_size=pool.max_batch_size, heartbeat_interval_s=workers.heartbeat_interval_s,
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


class Hung(str):
    """A reason to stop the process that means it stopped answering (worth a stack dump)."""


async def run_process(state: PoolState, worker: Replica, pool: Pool, workers: Workers, data_dir: Path,
                      restart: asyncio.Event) -> tuple[str, bool, bool]:
    """Run one process in this slot until it dies or must be stopped.
    Returns (why, failed at boot, restart requested)."""
    control: asyncio.Queue = asyncio.Queue()
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    settings = msgspec.json.encode(worker_settings(pool, workers, data_dir, worker.device)).decode()
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
    hung = False
    try:
        conn = await WorkerConnection.attach(parent_sock, control.put_nowait)
        state.starting(worker, proc.pid, conn)
        log.info("worker %s spawned (pid %d, %s)", worker.id, proc.pid, worker.device)
        why, at_boot, requested = await _watch(state, worker, workers, proc, conn, control, restart)
        hung = isinstance(why, Hung)
        return str(why), at_boot, requested
    finally:
        # Cancellation (shutdown) lands here too: the process must not outlive us.
        if hung:
            await _dump_stack(worker, proc)
        await _terminate(worker, proc, workers.stop_grace_s)
        parent_sock.close()


async def _watch(state: PoolState, worker: Replica, w: Workers, proc, conn: WorkerConnection,
                 control: asyncio.Queue, restart: asyncio.Event) -> tuple[str, bool, bool]:
    spawned = time.monotonic()
    hung_after = w.heartbeat_interval_s * w.missed_heartbeats
    exited = asyncio.ensure_future(proc.wait())
    restart_wait = asyncio.ensure_future(restart.wait())
    ready = False
    try:
        while True:
            getter = asyncio.ensure_future(control.get())
            done, _ = await asyncio.wait({getter, exited, restart_wait}, timeout=w.heartbeat_interval_s / 2,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
            else:
                msg = getter.result()
                if isinstance(msg, Heartbeat):
                    state.heartbeat(worker, msg)
                elif isinstance(msg, Ready):
                    ready = True
                    log.info("worker %s ready (%s on %s) after %.1fs", worker.id, msg.model, msg.device,
                             time.monotonic() - spawned)
                    state.became_ready(worker, msg)
                elif isinstance(msg, Fatal):
                    log.error("worker %s reported a fatal error: %s", worker.id, msg.message)
                    return msg.message, msg.at_boot, False
                elif msg is None:
                    return f"connection closed (exit code {await _exit_code(proc)})", not ready, False
            if restart_wait in done:
                restart.clear()
                return "restart requested", False, True
            if exited in done:
                return f"exited with code {proc.returncode}", not ready, False
            now = time.monotonic()
            heard = max(worker.last_heartbeat, conn.last_data)  # any bytes from it: it is alive
            if now - heard > hung_after:
                return Hung(f"no heartbeat for {now - heard:.1f}s (hung)"), not ready, False
            if ready and worker.engine_stall_s > w.engine_stall_timeout_s:
                return Hung(f"engine stalled for {worker.engine_stall_s:.0f}s"), False, False
            if not ready and now - spawned > w.boot_timeout_s:
                return f"not ready after {w.boot_timeout_s:.0f}s", True, False
    finally:
        exited.cancel()
        restart_wait.cancel()
        # Closing the connection fails the worker's open requests at once, so they fail over
        # now rather than after the process is gone.
        conn.close()


async def _dump_stack(worker: Replica, proc) -> None:
    """Ask a hung worker for every thread's stack (faulthandler writes it to its stderr, which is
    our log) before it is killed, so the operator learns where it hung."""
    if proc.returncode is not None:
        return
    log.warning("worker %s (pid %d) hung: its stack follows in this log (signal %s)", worker.id, proc.pid,
                STACK_DUMP_SIGNAL.name)
    try:
        proc.send_signal(STACK_DUMP_SIGNAL)
        proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process must run to write it
    except ProcessLookupError:
        return
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), STACK_DUMP_WAIT_S)
    except asyncio.TimeoutError:
        pass


async def _terminate(worker: Replica, proc, grace: float) -> None:
    if proc.returncode is not None:
        return
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
