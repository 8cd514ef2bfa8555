"""The worker process: one engine, one socket to the proxy.

The event loop (main thread) reads Generate/Cancel frames from the proxy and sends heartbeats; the
engine runs model work on its own thread and hands finished frames back to the loop. Ready goes out
only after a warm-up generation succeeded; anything fatal is reported with a Fatal frame before exit.
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

import msgspec

from backend import protocol
from backend.protocol import (STACK_DUMP_SIGNAL, Cancel, Detokenize, Fatal, Generate, Heartbeat, Ready, Tokenize,
                              WorkerSettings)

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
    def __init__(self, settings: WorkerSettings, sock: socket.socket) -> None:
        self.settings = settings
        self.sock = sock
        self.engine = None
        self.writer: asyncio.StreamWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        self.done = asyncio.Event()

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.done.set)
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._read(reader))]
        threading.Thread(target=self._engine_thread, name="engine", daemon=True).start()
        await self.done.wait()
        for t in tasks:
            t.cancel()
        if self.engine is not None:
            self.engine.stop()
        try:
            await asyncio.wait_for(self.writer.drain(), 2)
        except (OSError, asyncio.TimeoutError):
            pass
        return self.exit_code

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
        log.info("engine %s ready on %s in %.1fs", engine.name, self.settings.device, time.monotonic() - started)
        self._send_threadsafe([Ready(pid=os.getpid(), model=self.settings.model_name, device=self.settings.device,
                                     engine=engine.name, max_batch_size=engine.max_batch_size,
                                     context_length=engine.context_length)])
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

    def _fatal(self, message: str, at_boot: bool) -> None:
        self.exit_code = EXIT_BOOT_FAILURE if at_boot else EXIT_FATAL
        self._send_threadsafe([Fatal(message=message[:4000], at_boot=at_boot)])
        self.loop.call_soon_threadsafe(self.done.set)

    def _emit(self, frames: list) -> None:
        self._send_threadsafe(frames)

    def _send_threadsafe(self, frames: list) -> None:
        data = protocol.encode_many(frames)
        self.loop.call_soon_threadsafe(self._write, data)

    def _write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    # --- event loop -----------------------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = protocol.worker_decoder()
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    log.info("proxy closed the connection; exiting")
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
        except ConnectionError as exc:
            # A reset or broken pipe is the proxy going away (for example, it stopped because a port
            # was taken while this worker was still booting): the same as a clean close.
            log.info("proxy closed the connection (%s); exiting", exc)
        except (OSError, protocol.FrameError) as exc:
            log.error("connection to the proxy failed: %s", exc)
        self.done.set()

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            engine = self.engine
            if engine is None:
                hb = Heartbeat()
            else:
                running, waiting = engine.load
                hb = Heartbeat(running=running, waiting=waiting,
                               engine_stall_s=round(time.monotonic() - engine.last_tick, 3),
                               generated_tokens=engine.generated_tokens, kv_slots=engine.max_batch_size,
                               memory_bytes=_rss_bytes(), gpu_memory_bytes=engine.gpu_memory_bytes(),
                               weight_bytes=engine.weight_bytes)
            self._write(protocol.encode(hb))
            await asyncio.sleep(interval)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend")
    parser.add_argument("--fd", type=int, required=True, help="inherited Unix socket to the proxy")
    parser.add_argument("--settings", required=True, help="WorkerSettings as JSON")
    parser.add_argument("--worker-id", default="worker")
    args = parser.parse_args(argv)
    die_with_parent()
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.worker_id} pid={os.getpid()}] %(message)s")
    try:
        settings = msgspec.json.decode(args.settings, type=WorkerSettings)
    except msgspec.ValidationError as exc:
        print(f"invalid worker settings: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=args.fd)
    code = asyncio.run(Worker(settings, sock).run())
    logging.shutdown()
    sys.stdout.flush()
    # The engine thread may sit inside a long torch call; it holds nothing that needs cleanup.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
