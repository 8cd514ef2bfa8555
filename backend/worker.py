"""The worker process: one engine, serving its frames on a Unix socket to one proxy at a time.

The event loop (main thread) reads Generate/Cancel frames from the proxy and sends heartbeats; the
engine runs model work on its own thread and writes its frames straight into the proxy's socket
(backend/proxy_link.py: the loop only sends what the socket did not take at once). Ready goes out
only after a warm-up generation succeeded; anything fatal is reported with a Fatal frame before exit.

The worker outlives its proxy: it listens on a socket in the data directory (owner-only, and only
connections from its own user are served), and every connection starts with Hello (pid, settings
digest, start time) so that a new proxy can adopt it with its model loaded. When the proxy goes
away, every request it sent is cancelled; a worker that has had no proxy for its orphan timeout
exits, so nothing is left running for good. With an orphan timeout of 0 it dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import msgspec

from backend import protocol
from backend.heap import settle_the_heap
from backend.proxy_link import ProxyLink
from backend.protocol import (STACK_DUMP_SIGNAL, Cancel, Detokenize, Fatal, Generate, Heartbeat, Hello, Ready,
                              Tokenize, WorkerSettings)

log = logging.getLogger("fullpower.worker")

EXIT_BOOT_FAILURE = 3
EXIT_FATAL = 4


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the proxy dies, so a killed proxy leaves no orphan."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def build_engine(settings: WorkerSettings):
    if settings.engine == "fake":
        from backend.fake import FakeEngine

        return FakeEngine(settings)
    from backend.engine import TransformersEngine

    return TransformersEngine(settings)


class Worker:
    def __init__(self, settings: WorkerSettings, listener: socket.socket, digest: str, orphan_timeout_s: float) -> None:
        self.settings = settings
        self.listener = listener
        self.hello = Hello(pid=os.getpid(), digest=digest, started_at=time.time())
        self.orphan_timeout_s = orphan_timeout_s
        self.engine = None
        self.ready: Ready | None = None  # sent on every new connection once the engine is up
        self.fatal: Fatal | None = None  # likewise, when boot failed before a proxy connected
        self.writer: asyncio.StreamWriter | None = None  # the current proxy's connection
        self.link: ProxyLink | None = None  # its write side, for every thread
        self.proxy_left_at: float | None = time.monotonic()  # None while a proxy is connected
        self.connected = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        self.done = asyncio.Event()

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.done.set)
        server = await asyncio.start_unix_server(self._serve, sock=self.listener)
        tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._orphan_watch())]
        threading.Thread(target=self._engine_thread, name="engine", daemon=True).start()
        await self.done.wait()
        if self.exit_code and not self.connected.is_set():
            try:  # a boot failure before any proxy connected: give it a moment to learn why
                await asyncio.wait_for(self.connected.wait(), 2.0)
            except asyncio.TimeoutError:
                pass
        for t in tasks:
            t.cancel()
        server.close()
        if self.engine is not None:
            self.engine.stop()
        if self.link is not None:
            try:  # a Fatal frame or the last tokens on their way out
                await asyncio.wait_for(self.link.drained.wait(), 2)
            except asyncio.TimeoutError:
                pass
        return self.exit_code

    # --- connections ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_proxy(reader, writer)
        except asyncio.CancelledError:
            writer.close()  # the worker is exiting; asyncio's server would log a cancelled handler as an error

    async def _serve_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        _, uid, _ = protocol.peer_credentials(sock)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d (only this worker's own user may connect)", uid)
            writer.close()
            return
        if self.writer is not None:
            # A new proxy while the old connection still looks open (the old proxy was killed and its
            # socket not yet closed): the new one takes over.
            log.info("a new proxy connected; dropping the previous connection")
            old, self.writer = self.writer, None
            self._drop_link()
            old.close()
            await self._cancel_all()
        link = ProxyLink(self.loop, sock.fileno())
        # Hello first: nothing else can be written on this link before it is published below
        link.write(protocol.encode_many([self.hello] + [m for m in (self.ready, self.fatal) if m is not None]
                                        + [self._heartbeat()]))
        self.writer, self.link = writer, link
        self.proxy_left_at = None
        self.connected.set()
        await self._read(reader)
        if self.writer is writer:
            self.writer = None
            self._drop_link()
            self.proxy_left_at = time.monotonic()
            writer.close()
            await self._cancel_all()
            if self.orphan_timeout_s and not self.done.is_set():
                log.info("proxy gone: its requests cancelled; waiting up to %.0fs for a proxy to adopt this worker",
                         self.orphan_timeout_s)

    def _drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()

    async def _cancel_all(self) -> None:
        """Cancel every request of the proxy that left, and wait until the engine has (so none of
        their frames reach the next proxy)."""
        if self.engine is None:
            return
        cancelled = asyncio.Event()
        self.engine.cancel_all(lambda: self._in_loop(cancelled.set))
        try:
            await asyncio.wait_for(cancelled.wait(), 10.0)
        except asyncio.TimeoutError:
            log.warning("the engine did not confirm cancelling the previous proxy's requests within 10s")

    async def _orphan_watch(self) -> None:
        if not self.orphan_timeout_s:
            return  # dies with its parent instead (PR_SET_PDEATHSIG)
        while True:
            await asyncio.sleep(min(1.0, self.orphan_timeout_s / 4))
            left = self.proxy_left_at
            if left is not None and time.monotonic() - left > self.orphan_timeout_s:
                log.warning("no proxy for %.0fs (workers.orphan_timeout_s): exiting", self.orphan_timeout_s)
                self.done.set()
                return

    # --- engine thread --------------------------------------------------------------------------
    def _engine_thread(self) -> None:
        started = time.monotonic()
        try:
            engine = build_engine(self.settings)
            engine.warm_up()
        except BaseException as exc:  # noqa: BLE001 - any boot failure is reported, then we exit
            log.error("worker failed at boot: %s", exc, exc_info=not isinstance(exc, RuntimeError))
            self._fatal(f"{type(exc).__name__}: {exc}", at_boot=True)
            return
        self.engine = engine
        engine.emit = self._emit
        settle_the_heap()  # the model and the engine's buffers are made: out of the collector's sight
        log.info("engine %s ready on %s in %.1fs", engine.name, self.settings.device, time.monotonic() - started)
        ready = Ready(pid=os.getpid(), model=self.settings.model_name, device=self.settings.device,
                      engine=engine.name, max_batch_size=engine.max_batch_size, context_length=engine.context_length)
        self._in_loop(self._became_ready, ready)
        try:
            self._run_engine(engine)
        except BaseException as exc:  # noqa: BLE001 - e.g. CUDA out of memory: report, then exit
            log.exception("engine failed")
            self._fatal(f"{type(exc).__name__}: {exc}", at_boot=False)

    def _run_engine(self, engine) -> None:
        try:
            import torch

            with torch.inference_mode():
                engine.run_forever()
        except ImportError:  # the fake engine on a host without torch
            engine.run_forever()

    def _in_loop(self, fn, *args) -> None:
        """Hand `fn` to the event loop from the engine thread. Once the loop has closed (the worker
        is exiting: its proxy stopped it during boot, say) nobody is left to tell: it is dropped,
        not raised in the engine thread."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def _became_ready(self, ready: Ready) -> None:
        self.ready = ready
        # the engine's figures (weights, KV slots) with it, not a heartbeat interval later
        self._write(protocol.encode_many([ready, self._heartbeat()]))

    def _fatal(self, message: str, at_boot: bool) -> None:
        self.exit_code = EXIT_BOOT_FAILURE if at_boot else EXIT_FATAL
        fatal = Fatal(message=message[:4000], at_boot=at_boot)

        def report() -> None:
            self.fatal = fatal
            self._write(protocol.encode(fatal))
            self.done.set()
        self._in_loop(report)

    def _emit(self, frames: list) -> None:
        """The engine thread's frames, straight into the proxy's socket (a step's plain tokens as
        one TokenBatch)."""
        self._write(protocol.encode_many(protocol.batch_tokens(frames)))

    def _write(self, data: bytes) -> None:
        link = self.link
        if link is not None:  # no proxy: nobody to read it
            link.write(data)

    # --- event loop -----------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = protocol.worker_decoder()
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                for msg in decoder.feed(data):
                    if self.engine is None:
                        continue  # not ready: the proxy sends nothing before Ready
                    if isinstance(msg, Generate):
                        self.engine.submit(msg)
                    elif isinstance(msg, Cancel):
                        self.engine.cancel(msg.id)
                    elif isinstance(msg, (Tokenize, Detokenize)):
                        self.engine.submit_tokenizer_call(msg)
        except ConnectionError:
            pass  # a reset or broken pipe is the proxy going away: the same as a clean close
        except (OSError, protocol.FrameError) as exc:
            log.error("connection to the proxy failed: %s", exc)
        if not self.orphan_timeout_s:
            log.info("proxy closed the connection; exiting")
            self.done.set()

    def _heartbeat(self) -> Heartbeat:
        engine = self.engine
        if engine is None:
            return Heartbeat()
        running, waiting = engine.load
        return Heartbeat(running=running, waiting=waiting, engine_stall_s=round(time.monotonic() - engine.last_tick, 3),
                         generated_tokens=engine.generated_tokens, kv_slots=engine.max_batch_size,
                         memory_bytes=_rss_bytes(), gpu_memory_bytes=engine.gpu_memory_bytes(),
                         weight_bytes=engine.weight_bytes,
                         host_seconds={part: round(s, 6) for part, s in list(engine.host_seconds.items())},
                         decode_steps=engine.decode_steps)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            self._write(protocol.encode(self._heartbeat()))
            await asyncio.sleep(interval)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def listen(path: Path) -> socket.socket:
    """The worker's socket: in an owner-only directory, owner-only itself. A socket file left by a
    dead worker is replaced; one a live worker answers on is not (that slot is taken)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale
        else:
            raise RuntimeError(f"{path}: another worker is serving on this socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(4)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend")
    parser.add_argument("--listen", required=True, help="Unix socket path to serve the proxy on")
    parser.add_argument("--digest", default="", help="settings digest echoed in Hello (adoption)")
    parser.add_argument("--orphan-timeout", type=float, default=0.0,
                        help="seconds without a proxy before exiting; 0 = die with the parent process")
    parser.add_argument("--settings", required=True, help="WorkerSettings as JSON")
    parser.add_argument("--worker-id", default="worker")
    args = parser.parse_args(argv)
    if not args.orphan_timeout:
        die_with_parent()
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.worker_id} pid={os.getpid()}] %(message)s")
    try:
        settings = msgspec.json.decode(args.settings, type=WorkerSettings)
    except msgspec.ValidationError as exc:
        print(f"invalid worker settings: {exc}", file=sys.stderr)
        return 2
    path = Path(args.listen)
    try:
        sock = listen(path)
    except (OSError, RuntimeError) as exc:
        print(f"cannot serve on {path}: {exc}", file=sys.stderr)
        return 2
    inode = os.stat(path).st_ino
    try:
        code = asyncio.run(Worker(settings, sock, args.digest, args.orphan_timeout).run())
    finally:
        try:
            if os.stat(path).st_ino == inode:  # still ours (not a successor's)
                path.unlink()
        except OSError:
            pass
    logging.shutdown()
    sys.stdout.flush()
    # The engine thread may sit inside a long torch call; it holds nothing that needs cleanup.
    os._exit(code)
