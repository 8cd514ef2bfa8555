"""One worker process from spawn (or adoption) to exit: its settings and environment, the watch
for signs of trouble (exit, missed heartbeats, a Fatal frame, a stalled engine, a restart
request), a stack dump when it hung, and a stop that always ends the process (SIGTERM, then
SIGKILL).

Adoption: a worker serves on a Unix socket in the data directory and outlives a proxy that died.
Before spawning, the slot's socket is tried: a worker answering there whose Hello carries the
digest this slot would start it with (settings, device, the model's manifest) is adopted with its
model loaded; one with another digest is stopped and replaced."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import msgspec

from backend.manifest import MANIFEST
from backend.protocol import PROTOCOL_VERSION, STACK_DUMP_SIGNAL, Fatal, Heartbeat, Hello, Ready, WorkerSettings
from proxy.config import Pool, Workers, model_dir
from proxy.fleet.pool import PoolState, Replica
from proxy.fleet.worker_client import WorkerConnection

log = logging.getLogger("fullpower.supervisor")
STACK_DUMP_WAIT_S = 1.0  # time a hung worker gets to write its stack before SIGTERM
HELLO_WAIT_S = 5.0  # a worker answers a new connection with Hello at once
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; longer data directories use a short private path


def worker_socket_path(data_dir: Path, worker_id: str) -> Path:
    """Where the worker of this slot serves: <data_dir>/run/<id>.sock, or, when that path is too
    long for a Unix socket, a private (0700) directory under the temporary directory, named after
    the data directory so two appliances never share one."""
    path = data_dir / "run" / f"{worker_id}.sock"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fullpower-{os.getuid()}" / f"{tag}-{worker_id}.sock"


def settings_digest(settings_json: str, device: str, model_path: Path) -> str:
    """What a worker must have been started with to be adopted by this slot: its settings, its
    device, the worker protocol's version, and its model's manifest (a model replaced on disk
    means a new worker)."""
    h = hashlib.sha256(settings_json.encode())
    h.update(b"\0" + device.encode() + b"\0" + str(PROTOCOL_VERSION).encode() + b"\0")
    try:
        h.update((model_path / MANIFEST).read_bytes())
    except OSError:
        pass
    return h.hexdigest()


class AdoptedProcess:
    """A worker process this proxy did not start: waited on through a pidfd (it is not our child,
    so there is no exit code to read); the same face as asyncio's Process for the watch and stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None
            self._gone()
            return
        self._loop.add_reader(self._fd, self._gone)

    def _gone(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if not self._exited.done():
            self.returncode = -1  # exited; its status went to its own parent
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def worker_settings(pool: Pool, workers: Workers, data_dir: Path, device: str) -> WorkerSettings:
    f = pool.fake
    return WorkerSettings(
        engine=pool.engine, model_name=pool.model, model_path=str(model_dir(pool, data_dir)),
        device="cuda:0" if device.startswith("cuda") else "cpu", dtype=pool.dtype,
        max_batch_size=pool.max_batch_size, heartbeat_interval_s=workers.heartbeat_interval_s,
        verify_manifest=pool.verify_manifest, cpu_threads=pool.cpu_threads, max_context=pool.max_context,
        kv_cache_fraction=pool.kv_cache_fraction, cuda_graphs=pool.cuda_graphs,
        prefill_budget_tokens=pool.prefill_budget_tokens, prefill_wait_ms=pool.prefill_wait_ms,
        overlap_prefill=pool.overlap_prefill, stream_interval=pool.stream_interval,
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
                      restart: asyncio.Event, handing_over: Callable[[], bool] = lambda: False) -> tuple[str, bool, bool]:
    """Adopt the worker serving on this slot's socket, or spawn one, and run it until it dies or
    must be stopped. Returns (why, failed at boot, restart requested). Cancelled while
    `handing_over()`, the process is left running for the next proxy."""
    control: asyncio.Queue = asyncio.Queue()
    settings = msgspec.json.encode(worker_settings(pool, workers, data_dir, worker.device)).decode()
    path = worker_socket_path(data_dir, worker.id)
    digest = settings_digest(settings, worker.device, model_dir(pool, data_dir))
    proc, conn, hung, cancelled = None, None, False, False
    try:
        state.starting(worker, None, None)  # its process (adopted or spawned) is known once connected
        adopted = await _adopt(worker, path, digest, control, workers.stop_grace_s)
        if adopted is not None:
            proc, conn, hello = adopted
            log.info("worker %s adopted (pid %d, running for %.0fs, model kept loaded)", worker.id, proc.pid,
                     time.time() - hello.started_at)
        else:
            spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
                sys.executable, "-m", "backend", "--listen", str(path), "--digest", digest,
                "--orphan-timeout", str(workers.orphan_timeout_s), "--settings", settings,
                "--worker-id", worker.id, env=worker_env(worker.device), stdin=asyncio.subprocess.DEVNULL,
                # its own session: it outlives this proxy unless told otherwise (orphan timeout 0)
                start_new_session=workers.orphan_timeout_s > 0))
            try:
                proc = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                # A stop while the process is being started: it may exist already, and it must not
                # be left behind (finally: below stops it).
                try:
                    proc = await spawn
                except OSError:
                    pass
                raise
            except OSError as exc:
                return f"spawn failed: {exc}", True, False
            log.info("worker %s spawned (pid %d, %s)", worker.id, proc.pid, worker.device)
            found = await _connect(proc, path, digest, control)
            if isinstance(found, str):
                return found, True, False
            conn, hello = found
        state.connected(worker, conn, proc.pid, hello.started_at, adopted=adopted is not None)
        why, at_boot, requested = await _watch(state, worker, workers, proc, conn, control, restart)
        hung = isinstance(why, Hung)
        return str(why), at_boot, requested
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        # Cancellation (shutdown) lands here too: the process must not outlive a stop, unless it
        # is handed over to the next proxy.
        if conn is not None:
            conn.close()
        if proc is not None and cancelled and handing_over() and proc.returncode is None:
            log.info("worker %s (pid %d) left running for the next proxy to adopt", worker.id, proc.pid)
        elif proc is not None:
            if hung:
                await _dump_stack(worker, proc)
            await _terminate(worker, proc, workers.stop_grace_s)


async def _adopt(worker: Replica, path: Path, digest: str, control: asyncio.Queue, grace: float):
    """(process, connection, hello) of a worker already serving on `path` with this digest; None
    when there is none - a worker there with another digest is stopped first."""
    if not path.exists():
        return None
    try:
        conn = await WorkerConnection.connect(str(path), control.put_nowait)
    except OSError:
        return None  # a stale socket file: the new worker replaces it
    hello = await _hello(control)
    peer = conn.peer_pid()
    if hello is None and peer:
        # It accepts (the kernel does that) but says nothing: a hung worker (stopped, stuck). It
        # holds the slot's socket, so it must go before a new one can serve there; the socket's
        # owner-only directory means it is this user's process.
        conn.close()
        log.warning("worker %s at %s (pid %d) does not answer: stopping it", worker.id, path, peer)
        await _terminate(worker, AdoptedProcess(peer), grace)
        _drain(control)
        return None
    if hello is None or peer != hello.pid:
        conn.close()
        log.warning("something at %s that is not a fullpower worker (peer pid %s); not adopting it", path, peer)
        return None
    proc = AdoptedProcess(hello.pid)
    if hello.digest != digest:
        conn.close()
        log.warning("worker %s (pid %d) runs with other settings, device or model than the config's: replacing it",
                    worker.id, hello.pid)
        await _terminate(worker, proc, grace)
        _drain(control)
        return None
    return proc, conn, hello


async def _connect(proc, path: Path, digest: str, control: asyncio.Queue):
    """Connect to a spawned worker once it serves (connection, hello), or the reason it did not."""
    deadline = time.monotonic() + 60.0
    while True:
        if proc.returncode is not None:
            return f"exited with code {proc.returncode} before serving on {path}"
        try:
            conn = await WorkerConnection.connect(str(path), control.put_nowait)
            break
        except OSError:
            if time.monotonic() > deadline:
                return f"not serving on {path} after 60s"
            await asyncio.sleep(0.02)
    hello = await _hello(control)
    if hello is None or hello.digest != digest or hello.pid != proc.pid:
        conn.close()
        return f"the process at {path} is not the worker just spawned"
    return conn, hello


async def _hello(control: asyncio.Queue) -> Hello | None:
    try:
        msg = await asyncio.wait_for(control.get(), HELLO_WAIT_S)
    except asyncio.TimeoutError:
        return None
    return msg if isinstance(msg, Hello) else None


def _drain(control: asyncio.Queue) -> None:
    while not control.empty():
        control.get_nowait()


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
        # now rather than after the process is gone (the worker cancels them on its side).
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
