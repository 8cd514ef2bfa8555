"""One request's run on the workers: pick a worker, send the Generate frame, yield its frames.

Failures before the first token are retried on another worker. A worker that dies after tokens
were sent is replaced too: the generation resumes on another worker from the prompt plus every token
id already sent, so the client sees one uninterrupted stream (token-exact for greedy decoding).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Callable

from backend.protocol import Failed, Finished, Generate, Tokens
from proxy.errors import InvalidRequest, NoWorkerReady, UpstreamError, UpstreamTimeout
from proxy.pool import PoolState, Worker
from proxy.worker_client import WorkerGone

_request_ids = itertools.count(1)
KEEPALIVE_S = 15.0
MAX_WORKERS_TRIED = 3


class Generation:
    def __init__(self, pools: PoolState, pool: str, make: Callable[[int, list[int]], Generate],
                 first_token_s: float, idle_s: float, keepalive_s: float = KEEPALIVE_S) -> None:
        self.pools = pools
        self.pool = pool
        self.make = make  # (request id, resume token ids) -> Generate
        self.first_token_s = first_token_s
        self.idle_s = idle_s
        self.keepalive_s = keepalive_s
        self.worker: Worker | None = None
        self.token_ids: list[int] = []
        self.failovers = 0
        self._since = 0.0  # loop time of the last progress (attempt start or a token)

    async def frames(self) -> AsyncIterator[Tokens | Finished | None]:
        """Tokens frames, then one Finished. None means "idle for keepalive_s" (send a keepalive)."""
        tried: list[str] = []
        while True:
            worker = self.pools.pick(self.pool, exclude=tried)
            if worker is None:
                if tried:
                    raise UpstreamError("The worker serving this request failed and no other worker is available.")
                raise NoWorkerReady("No worker is ready to serve this model; retry shortly.", retry_after=1.0)
            self.worker = worker
            generation = self.pools.acquire(worker)
            rid = next(_request_ids)
            stream = worker.conn.generate(self.make(rid, list(self.token_ids)))
            self._since = asyncio.get_running_loop().time()
            try:
                while True:
                    item = await self._next(stream)
                    if item is None or isinstance(item, Tokens):
                        if item is not None:
                            self.token_ids.extend(item.token_ids)
                            self._since = asyncio.get_running_loop().time()
                        yield item
                    elif isinstance(item, Finished):
                        yield item
                        return
                    elif isinstance(item, Failed):
                        if item.code == "invalid_request":
                            raise InvalidRequest(item.message, param="messages")
                        raise UpstreamError(f"The worker failed to serve the request: {item.message}")
                    elif isinstance(item, WorkerGone):
                        tried.append(worker.id)
                        self.failovers += 1
                        if len(tried) >= MAX_WORKERS_TRIED:
                            raise UpstreamError("The request failed on several workers.")
                        break
            finally:
                if not stream.closed and worker.conn is not None:
                    worker.conn.cancel(rid)
                self.pools.release(worker, generation)

    async def _next(self, stream):
        limit = self.idle_s if self.token_ids else self.first_token_s
        loop = asyncio.get_running_loop()
        deadline = self._since + limit
        while True:
            wait = min(self.keepalive_s, deadline - loop.time())
            if wait <= 0:
                what = "between tokens" if self.token_ids else "for the first token"
                raise UpstreamTimeout(f"The worker sent nothing {what} for {limit:.0f}s.")
            try:
                async with asyncio.timeout(wait):
                    return await stream.next()
            except TimeoutError:
                if loop.time() < deadline:
                    return None
