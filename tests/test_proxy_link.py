"""The worker's write side (backend/proxy_link.py): frames written from several threads arrive
whole and in order when the socket cannot take them at once, and a reader that stops reading
cannot make the worker buffer without bound."""

import asyncio
import socket
import threading

from backend import proxy_link
from backend.proxy_link import ProxyLink


async def read_all(sock: socket.socket, size: int, deadline_s: float = 30.0) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(deadline_s):
        while len(got) < size:
            chunk = await loop.sock_recv(sock, 1 << 16)
            if not chunk:
                break
            got += chunk
    return bytes(got)


def test_frames_from_two_threads_arrive_whole_and_in_order_past_a_full_socket():
    async def main():
        loop = asyncio.get_running_loop()
        ours, proxy = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        proxy.setblocking(False)
        link = ProxyLink(loop, ours.fileno())
        # each thread's frames carry its name and a sequence number; 2 MiB in all, far past the buffer
        frames = {name: [f"<{name}{i:06d}".encode().ljust(512, b".") + b">" for i in range(2048)]
                  for name in ("e", "h")}
        writers = [threading.Thread(target=lambda fs=fs: [link.write(f) for f in fs]) for fs in frames.values()]
        for w in writers:
            w.start()
        total = sum(len(f) for fs in frames.values() for f in fs)
        got = await read_all(proxy, total)
        for w in writers:
            w.join()
        await asyncio.wait_for(link.drained.wait(), 30)
        assert len(got) == total
        pieces = got.split(b">")[:-1]
        for name, fs in frames.items():
            assert [p + b">" for p in pieces if p.startswith(b"<" + name.encode())] == fs
        link.close()
        ours.close()
        proxy.close()
    asyncio.run(main())


def test_a_proxy_that_stops_reading_is_cut_off_at_the_bound(monkeypatch):
    monkeypatch.setattr(proxy_link, "MAX_PENDING_BYTES", 256 << 10)

    async def main():
        loop = asyncio.get_running_loop()
        ours, proxy = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proxy.setblocking(False)
        link = ProxyLink(loop, ours.fileno())
        frame = b"x" * 4096
        writes = 0
        while not link.closed:
            link.write(frame)
            writes += 1
            assert writes < 100_000, "the link never closed"
        # the proxy's side sees the end of the connection after what was sent
        got = await read_all(proxy, 1 << 30)
        assert len(got) < writes * len(frame)
        link.close()
        ours.close()
        proxy.close()
    asyncio.run(main())


def test_a_write_after_the_event_loop_closed_drops_instead_of_raising():
    """The engine thread may write while the worker is exiting (its proxy stopped it during boot):
    with the loop gone nothing can send the rest, so the link closes quietly - an exception there
    would end the engine thread with a traceback on the proxy's stderr."""
    loop = asyncio.new_event_loop()
    ours, proxy = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        link = ProxyLink(loop, ours.fileno())
        loop.close()
        link.write(b"x" * (1 << 20))  # more than the socket takes at once: the rest needs the loop
        assert link.closed
        link.write(b"more")  # and later writes are dropped too
    finally:
        ours.close()
        proxy.close()
