"""One request's run on the workers: pick a worker, send the Generate frame, yield its frames.

A worker that fails before the first token (crash, hang, internal error) is replaced by another
worker (internal errors within the retry budget). A worker that fails after tokens went out is replaced too: the
generation resumes on another worker from the prompt plus every token id already sent, so the
client sees one uninterrupted stream (token-exact for greedy decoding). Only when no other worker
can take over does the client get an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from typing import AsyncIterator, Callable

from backend.protocol import Failed, Finished, Generate, Tokens
from proxy.errors import InvalidRequest, NoWorkerReady, UpstreamError, UpstreamTimeout
from proxy.fleet.pool import Ejection, Outcome, PoolState, Replica
from proxy.fleet.worker_client import WorkerGone

# Request ids on worker connections (one counter: generations and tokenizer calls share connections).
next_request_id = itertools.count(1).__next__


class RetryBudget:
    """Retries in flight stay under `ratio` of active requests (but `minimum` are always allowed),
    so that retries cannot multiply the load when many workers fail at once (Envoy's retry budget)."""

    def __init__(self, ratio: float, minimum: int, active: Callable[[], int]) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.active = active
        self.retrying = 0

    def try_take(self) -> bool:
        if self.retrying < max(self.minimum, self.ratio * self.active()):
            self.retrying += 1
            return True
        return False

    def give_back(self) -> None:
        self.retrying -= 1


class Generation:
    def __init__(self, pools: PoolState, pool: str, make: Callable[[int, list[int]], Generate], cost: int, *,
                 first_token_s: float, idle_s: float, keepalive_s: float, budget: RetryBudget,
                 max_attempts: int, metrics=None, on_ejection: Callable[[Ejection], None] = lambda e: None) -> None:
        self.pools = pools
        self.pool = pool
        self.make = make  # (request id, resume token ids) -> Generate
        self.cost = cost
        self.first_token_s = first_token_s
        self.idle_s = idle_s
        self.keepalive_s = keepalive_s
        self.budget = budget
        self.max_attempts = max_attempts
        self.metrics = metrics
        self.on_ejection = on_ejection  # the supervisor's: log, count, maybe restart the process
        self.worker: Replica | None = None
        self.token_ids: list[int] = []
        self.dispatched_at: float | None = None  # time.monotonic() when the first Generate went out
        self.failovers = 0
        # Set by the consumer once it can take tokens without waking up (see RequestStream):
        # (text) -> bool, True when it delivered the token's text itself.
        self.direct_sink: Callable[[str], bool] | None = None

    async def frames(self) -> AsyncIterator[list | None]:
        """Batches of frames: Tokens, the last batch ending with one Finished. A batch holds every
        frame that arrived since the consumer last looked (one wake-up however far behind it is).
        None means "idle for keepalive_s" (send a keepalive)."""
        tried: list[str] = []
        holding_retry = False  # a retried request holds one unit of the budget until it ends
        try:
            while True:
                failure = None
                # aclosing: when our consumer stops early, the attempt's cleanup (cancel the
                # generation, release the worker) must run now, not whenever the GC gets to it.
                async with contextlib.aclosing(self._attempt(tried)) as attempt:
                    async for batch in attempt:
                        if batch is not None and isinstance(batch[-1], (Failed, WorkerGone)):
                            failure = batch.pop()
                            if not batch:
                                continue
                        yield batch
                if failure is None:
                    return
                if len(tried) >= self.max_attempts:
                    raise UpstreamError(f"The request failed on {len(tried)} workers ({failure}).")
                # A dead worker's requests fail over freely: they completed nowhere, and the
                # process is gone, so retrying them cannot feed a retry storm. Errors from live
                # workers spend the retry budget.
                if not holding_retry and not isinstance(failure, WorkerGone):
                    if not self.budget.try_take():
                        raise UpstreamError("The worker failed and the retry budget is spent; retry later.")
                    holding_retry = True
                self.failovers += 1
                if self.metrics is not None:
                    if self.token_ids:
                        self.metrics.resumes.inc()
                    else:
                        self.metrics.retries.labels("worker_gone" if isinstance(failure, WorkerGone)
                                                    else "worker_error").inc()
                await asyncio.sleep(random.uniform(0.0, 0.02 * len(tried)))  # jitter: failures cluster
        finally:
            if holding_retry:
                self.budget.give_back()

    def _direct(self, text: str, token_ids: list[int]) -> bool:
        """RequestStream's sink: a token's text goes straight to the consumer's direct sink, with
        the bookkeeping the consumer's wake-up would have done (resume ids, progress)."""
        sink = self.direct_sink
        if sink is None or not sink(text):
            return False
        self.token_ids.extend(token_ids)
        return True

    async def _attempt(self, tried: list[str]):
        """One worker's part: batches of its frames, the last ending with Finished, or with the
        failure to retry after; None for a keepalive."""
        # Prefer workers not tried yet; with attempts left but none untried, any but the last to fail.
        worker = self.pools.pick(self.pool, exclude=tried)
        if worker is None and tried:
            worker = self.pools.pick(self.pool, exclude=tried[-1:])
        if worker is None:
            if tried:
                raise UpstreamError("The worker serving this request failed and no other worker is available.")
            raise NoWorkerReady("No worker is ready to serve this model; retry shortly.", retry_after=1.0)
        loop = asyncio.get_running_loop()
        self.worker = worker
        epoch = self.pools.acquire(worker, self.cost)
        rid = next_request_id()
        stream = worker.conn.generate(self.make(rid, list(self.token_ids)))
        stream.sink = self._direct
        progress = quiet_since = loop.time()  # last frame; last frame or keepalive
        if self.dispatched_at is None:
            self.dispatched_at = time.monotonic()
        outcome = None
        try:
            while True:
                batch = stream.take()
                if not batch:
                    # tokens the direct path delivered count as progress
                    progress = max(progress, stream.last_arrival)
                    quiet_since = max(quiet_since, stream.last_arrival)
                    limit = self.idle_s if self.token_ids else self.first_token_s
                    now = loop.time()
                    if now >= progress + limit:
                        outcome = Outcome.GONE
                        what = "between tokens" if self.token_ids else "for the first token"
                        raise UpstreamTimeout(f"The worker sent nothing {what} for {limit:.0f}s.")
                    if now >= quiet_since + self.keepalive_s:
                        quiet_since = now
                        yield None
                        continue
                    await stream.wait_until(min(progress + limit, quiet_since + self.keepalive_s))
                    continue
                progress = quiet_since = loop.time()
                for i, item in enumerate(batch):
                    if isinstance(item, Tokens):
                        self.token_ids.extend(item.token_ids)
                        continue
                    if isinstance(item, Finished):
                        outcome = Outcome.OK
                    elif isinstance(item, Failed):
                        if item.code == "invalid_request":
                            outcome = Outcome.OK  # the request was at fault, not the worker
                            raise InvalidRequest(item.message, param=item.param or "messages")
                        outcome = Outcome.INTERNAL
                        tried.append(worker.id)
                    else:  # WorkerGone
                        outcome = Outcome.GONE
                        tried.append(worker.id)
                    del batch[i + 1:]  # nothing follows the end of a stream
                    yield batch
                    return
                yield batch
        finally:
            stream.release()
            if not stream.closed and worker.conn is not None:
                worker.conn.cancel(rid)
            ejection = self.pools.release(worker, epoch, self.cost, outcome)
            if ejection is not None:
                self.on_ejection(ejection)
