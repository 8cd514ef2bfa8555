"""The write side of the worker's connection to its proxy, usable from any thread.

Why: the engine thread hands every decode step's frames to the proxy. Handing them to the event
loop first (call_soon_threadsafe) costs a wake-up of the loop's thread per step, and that thread
needs the interpreter lock the engine thread is using - on the H200 the worker process, not the
GPU, bounded the served throughput. Here the engine thread writes its frames straight into the
socket (one non-blocking send, which releases the lock while in the kernel); only what the socket
does not take at once is queued, in order, for the event loop to send when the socket is writable.

Bounded: a proxy that leaves MAX_PENDING_BYTES unread is not reading; the link closes (the reader
then sees the connection end, as for a proxy that went away).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading

log = logging.getLogger("fullpower.worker")

MAX_PENDING_BYTES = 64 << 20


class ProxyLink:
    def __init__(self, loop: asyncio.AbstractEventLoop, connection_fd: int) -> None:
        # A socket object of our own on the same connection: the event loop's transport keeps the
        # original for reading; writes go through this one only.
        self._sock = socket.socket(fileno=os.dup(connection_fd))
        self._sock.setblocking(False)
        self._loop = loop
        self._lock = threading.Lock()  # one writer at a time, so frames never interleave
        self._pending = bytearray()  # what the socket has not taken yet, in order
        self._watching = False  # the loop waits for the socket to be writable
        self.closed = False
        self.drained = asyncio.Event()  # set while nothing is pending (loop side)
        self.drained.set()

    def write(self, data: bytes) -> None:
        """Send `data` after everything written before it (any thread)."""
        with self._lock:
            if self.closed:
                return
            if self._pending:
                self._queue(data)
                return
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close_locked()  # the proxy went away; the reader sees the end
                return
            if sent < len(data):
                self._queue(memoryview(data)[sent:])
                try:
                    self._loop.call_soon_threadsafe(self._watch)
                except RuntimeError:  # the event loop has closed: the worker is exiting
                    self._close_locked()

    def _queue(self, data) -> None:
        if len(self._pending) + len(data) > MAX_PENDING_BYTES:
            log.error("the proxy left %d MiB of frames unread: closing its connection", MAX_PENDING_BYTES >> 20)
            self._close_locked()
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end: the proxy's requests are cancelled
            except OSError:
                pass
            return
        self._pending += data

    def _watch(self) -> None:  # event loop
        with self._lock:
            if self.closed or not self._pending or self._watching:
                return
            self._watching = True
            self.drained.clear()
        self._loop.add_writer(self._sock.fileno(), self._send_pending)

    def _send_pending(self) -> None:  # event loop, when the socket is writable
        with self._lock:
            try:
                sent = self._sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError:
                self._close_locked()
                sent = 0
            del self._pending[:sent]
            done = self.closed or not self._pending
            if done:
                self._watching = False
        if done:
            self._loop.remove_writer(self._sock.fileno())
            self.drained.set()

    def _close_locked(self) -> None:
        self.closed = True
        self._pending.clear()

    def close(self) -> None:
        """Stop writing (event loop): pending bytes are dropped, the socket object closed."""
        with self._lock:
            self.closed = True
            self._pending.clear()
            watching, self._watching = self._watching, False
        if watching:
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self.drained.set()
