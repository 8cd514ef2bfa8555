"""Single flight: identical in-flight requests share one generation.

A Flight runs its generation as a task of its own, not inside any one client's handler: so the
first client (the leader) can leave without cancelling it while others still wait. Each waiter
reads the flight's frames from the beginning (a late joiner gets the whole stream from its first
token, then the live tokens). When the last waiter leaves an unfinished flight, the generation is
cancelled. An error reaches every waiter.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable



class Flight:
    def __init__(self, key: str, tier: str = "", owner: str = "") -> None:
        self.key = key
        self.owner = owner  # the API key name of the request that started it
        self.tier = tier  # the highest tier among its waiters: admission queues it there
        self.tier_raised = asyncio.Event()
        self.frames: list = []  # Tokens..., Finished (every frame published so far, in order)
        self.error: BaseException | None = None
        self.done = False
        self.waiters = 0
        self.task: asyncio.Task | None = None
        self.worker = None  # the pool Worker generating it (for the response headers)
        self.dispatched_at: float | None = None
        self.queued_s: float | None = None
        self._changed = asyncio.Event()

    def publish(self, batch: list) -> None:
        self.frames.extend(batch)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, keepalive_s: float) -> AsyncIterator[list | None]:
        """Every frame from the start, in batches of what arrived since the follower last looked;
        None when nothing arrived for keepalive_s."""
        i = 0
        while True:
            if i < len(self.frames):
                batch = self.frames[i:]
                i += len(batch)
                yield batch
                continue  # more may have arrived while the follower was busy
            if self.done:
                if self.error is not None:
                    raise self.error
                return
            changed = self._changed
            try:
                async with asyncio.timeout(keepalive_s):
                    await changed.wait()
            except TimeoutError:
                yield None


class Coalescer:
    def __init__(self) -> None:
        self.flights: dict[str, Flight] = {}

    def get(self, key: str) -> Flight | None:
        flight = self.flights.get(key)
        return flight if flight is not None and not flight.done else None

    def start(self, key: str, run: Callable[[Flight], "asyncio.Future"], tier: str = "", owner: str = "") -> Flight:
        flight = Flight(key, tier, owner)
        self.flights[key] = flight
        flight.task = asyncio.create_task(self._run(flight, run), name=f"flight {key[:8]}")
        return flight

    async def _run(self, flight: Flight, run) -> None:
        try:
            await run(flight)
            flight.finish()
        except asyncio.CancelledError as exc:
            flight.finish(exc)
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            flight.finish(exc)
        finally:
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]

    def join(self, flight: Flight) -> None:
        flight.waiters += 1

    def leave(self, flight: Flight) -> None:
        flight.waiters -= 1
        if flight.waiters <= 0 and not flight.done and flight.task is not None:
            flight.task.cancel()  # nobody wants the answer any more

    async def close(self) -> None:
        tasks = [f.task for f in self.flights.values() if f.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
