"""One connection per worker: a protocol that decodes frames as they arrive and hands each
request's frames to that request's stream. A worker that goes away fails every open stream at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Union

from backend import protocol
from backend.protocol import Cancel, Failed, Finished, Generate, TokenBatch, Tokens


class WorkerGone(Exception):
    """The worker's connection closed (crash, kill, hang detected) while the request was open."""


StreamItem = Union[Tokens, Finished, Failed, WorkerGone]


class RequestStream:
    """The frames of one request, in order: Tokens*, then Finished or Failed (or WorkerGone).

    The consumer takes everything that arrived since it last looked (`take`), so one wake-up
    serves all the frames a slow consumer has fallen behind on. Waiting is bounded by a single
    timer per stream that is re-armed lazily (`wait_until`): arrivals never touch a timer.

    The direct path: while the consumer is parked in `wait_until` with nothing left to take, a
    token of a step's TokenBatch (text and ids) may be handed to `sink` by the connection's
    `data_received`, without waking the consumer (it returns False to decline: the token then
    queues as a Tokens frame and wakes the consumer as usual). Order is kept: the sink only sees a
    token when nothing is queued before it. (Tokens frames - those with logprobs - always queue:
    the streams that set a sink never ask for logprobs.) A stream's last tokens queue too when its
    end arrives in the same read: the consumer then sends them with the end in one write.
    """

    __slots__ = ("id", "_items", "_waiter", "closed", "_wake_at", "_timer", "_timer_at", "sink", "last_arrival")

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self._wake_at = 0.0  # when the current waiter must be woken at the latest (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.sink: Callable[[str, list[int]], bool] | None = None  # (text, token ids) -> taken
        self.last_arrival = 0.0  # loop time of the last frame the sink took (the consumer did not see it)

    def _push(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> list:
        """Every frame that arrived and was not taken yet (possibly none)."""
        items, self._items = self._items, []
        return items

    async def wait_until(self, when: float) -> None:
        """Return once a frame is there to take, or at loop time `when` (whichever is first).

        The deadline moves later with every frame, so the stream keeps one timer and moves it
        only when it must fire earlier; a timer that fires before the current deadline re-arms
        itself. Frames at full speed thus cost no timer operations at all."""
        if self._items:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_at = when
        if self._timer is None or self._timer_at > when:
            self._arm(loop, when)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._on_timer, loop), when

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms a timer again
        if loop.time() >= self._wake_at:
            self._waiter = None
            waiter.set_result(None)
        else:
            self._arm(loop, self._wake_at)

    def release(self) -> None:
        """The consumer is done with the stream: drop its timer and sink."""
        self.sink = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WorkerConnection(asyncio.Protocol):
    """Owns the socket to one worker process. `on_control` receives Ready, Heartbeat and Fatal
    frames and, with None, the news that the connection closed.

    Frames to the worker (Generate, Cancel) are gathered for the rest of the current loop
    iteration and written together: requests arrive in bursts (a step ends many streams and their
    clients send the next request at once), and each write to the worker's socket is a system call
    that wakes its process. Order is kept; nothing waits longer than one loop iteration."""

    def __init__(self, on_control: Callable[[object], None]) -> None:
        self._on_control = on_control
        self._decoder = protocol.proxy_decoder()
        self._streams: dict[int, RequestStream] = {}
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []  # frames for the worker, written at the end of this loop iteration
        # time.monotonic() of the last bytes from the worker: a worker that streams is alive, even
        # when its heartbeat frames queue behind megabytes of tokens
        self.last_data = time.monotonic()

    @classmethod
    async def connect(cls, path: str, on_control) -> "WorkerConnection":
        """Connect to a worker's socket (OSError when nothing serves there)."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(lambda: cls(on_control), path=path)
        return conn

    def peer_pid(self) -> int | None:
        """The pid of the process at the other end (the kernel's word, SO_PEERCRED)."""
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is None:
            return None
        return protocol.peer_credentials(sock)[0]

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        try:
            messages = self._decoder.feed(data)
        except protocol.FrameError:
            self._transport.close()
            return
        streams = self._streams
        arrival = None  # loop time, read once per read: one read carries a step's tokens for many streams
        # Streams whose end (Finished) came in this read, after their last tokens: those tokens
        # queue for the consumer instead of taking the direct path, so that it writes them with
        # the end of the stream in one send (the consumer wakes for the end anyway).
        ending = {msg.id for msg in messages if type(msg) is Finished} if len(messages) > 1 else ()
        for msg in messages:
            if type(msg) is TokenBatch:
                # The hot path: a step's tokens for many requests. The direct path (see
                # RequestStream): a stream whose consumer is parked hands the token to its sink.
                for rid, token_ids, text in zip(msg.ids, msg.token_ids, msg.texts):
                    stream = streams.get(rid)
                    if stream is None:
                        continue  # a cancelled request's late frames
                    sink = stream.sink
                    if (sink is not None and stream._waiter is not None and not stream._items
                            and rid not in ending and sink(text, token_ids)):
                        if arrival is None:
                            arrival = asyncio.get_running_loop().time()
                        stream.last_arrival = arrival
                    else:
                        stream._push(Tokens(id=rid, token_ids=token_ids, text=text))
                continue
            rid = getattr(msg, "id", None)
            if rid is None:
                self._on_control(msg)
                continue
            stream = streams.get(rid)
            if stream is None:
                continue  # a cancelled request's late frames
            stream._push(msg)
            if type(msg) is not Tokens:  # the end of its stream: Finished, Failed, TokenizeResult
                del streams[rid]
                stream.closed = True

    def connection_lost(self, exc) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.closed = True
            stream._push(WorkerGone("worker connection closed"))
        self._on_control(None)

    # requests
    def generate(self, msg: Generate) -> RequestStream:
        stream = RequestStream(msg.id)
        if self._transport is None or self._transport.is_closing():
            stream.closed = True
            stream._push(WorkerGone("worker connection closed"))
            return stream
        self._streams[msg.id] = stream
        self._send(protocol.encode(msg))
        return stream

    def cancel(self, request_id: int) -> None:
        if self._streams.pop(request_id, None) is not None and not self._transport.is_closing():
            self._send(protocol.encode(Cancel(id=request_id)))

    def _send(self, frame: bytes) -> None:
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(frame)

    def _flush(self) -> None:
        frames, self._outgoing = self._outgoing, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
