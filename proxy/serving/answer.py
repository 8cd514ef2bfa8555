"""What one request gets from the serving core: an Answer - where its frames come from (its own
generation, a shared flight, the cache) and who served it - and the replay of a cached answer as
frames. ServingCore (core.py) makes them; HTTP handlers and the job runner consume them."""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator, Callable

from backend.protocol import Finished, Tokens
from proxy.serving.cache import CachedAnswer
from proxy.serving.generation import Generation
from proxy.serving.record import RequestRecord
from proxy.serving.responses import Collected

Batch = list | None  # [Tokens..., Finished?] or None (keepalive)


class Answer:
    """Where one request's frames come from (its own generation, a shared flight, the cache) and
    who served it. `cache` is what the X-Fullpower-Cache header says: miss, hit, coalesced, bypass."""

    __slots__ = ("cache", "cache_header", "_frames", "_served_by", "_queued_s", "_rec", "_generation", "_cached",
                 "bodies")

    def __init__(self, cache: str, frames: AsyncIterator[Batch], served_by: Callable[[], tuple],
                 queued_s: Callable[[], float | None], rec: RequestRecord, same_owner: bool = True,
                 generation: Generation | None = None, cached: CachedAnswer | None = None,
                 bodies: dict | None = None) -> None:
        self._generation = generation  # its own generation (not a shared flight or the cache)
        self._cached = cached  # the cached answer `frames` replays (a hit)
        self.bodies = bodies  # a hit's pre-built responses, kept by the cache with the entry (AnswerCache.bodies)
        self.cache = cache  # the truth, for the access log and metrics
        # What the client is told: another key's answer (shared cache scope) or generation in
        # progress must not reveal that someone else just asked the same thing.
        self.cache_header = cache if same_owner else "miss"
        self._frames = frames
        self._served_by = served_by  # () -> (worker, dispatched_at or None)
        self._queued_s = queued_s
        self._rec = rec

    @classmethod
    def from_cache(cls, cached: CachedAnswer, rec: RequestRecord, same_owner: bool,
                   bodies: dict | None = None) -> "Answer":
        """A cache hit: its frames replay `cached`, and collecting takes it whole."""
        return cls("hit", replay_cached(cached), lambda: ((cached.worker, cached.model), None), lambda: None, rec,
                   same_owner=same_owner, cached=cached, bodies=bodies)

    @property
    def dispatched_at(self) -> float | None:
        return self._served_by()[1]

    async def frames(self) -> AsyncIterator[Batch]:
        rec = self._rec
        first = True
        async with contextlib.aclosing(self._frames) as frames:
            async for batch in frames:
                if first:  # the headers go out with the first batch, a keepalive included
                    first = False
                    self._record_served_by()
                if batch is not None:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.monotonic() - rec.started
                    last = batch[-1]
                    if isinstance(last, Finished):
                        rec.prompt_tokens, rec.completion_tokens = last.prompt_tokens, last.completion_tokens
                yield batch

    def deliver_directly(self, sink: Callable[[str], bool] | None) -> bool:
        """Let `sink` take each token's text as it arrives, without waking the consumer (True when
        this answer can: its own generation; a shared flight or a cached answer cannot). The
        consumer still gets every frame the sink declines, and the end of the stream."""
        if self._generation is None:
            return False
        self._generation.direct_sink = sink
        return True

    async def collect(self) -> Collected:
        """The whole answer (for non-streaming callers): its text, Finished frame and logprobs."""
        if self._cached is not None:  # a hit: the whole answer is here, no frames to walk through
            return self._collect_cached(self._cached)
        parts: list[str] = []
        logprobs: list = []
        finished = None
        rec = self._rec

        def take_text(text: str) -> bool:
            if rec.ttft_s is None:  # what frames() records with the first batch it sees
                rec.ttft_s = time.monotonic() - rec.started
            parts.append(text)
            return True

        # From the start, the text goes straight into `parts` as it arrives (the direct path, see
        # RequestStream): this task wakes for the end, not for the first tokens and each step after.
        # Order is kept: the sink only takes a token when nothing is queued before it; tokens it
        # does not take (those with logprobs, say) come as frames.
        self.deliver_directly(take_text)
        async with contextlib.aclosing(self.frames()) as frames:
            async for batch in frames:
                for item in batch or ():
                    if isinstance(item, Finished):
                        finished = item
                    else:
                        parts.append(item.text)
                        if item.logprobs:
                            logprobs.extend(item.logprobs)
        return Collected("".join(parts), finished, logprobs)

    def _collect_cached(self, cached: CachedAnswer) -> Collected:
        """What collecting replay_cached's frames gives, with the same record keeping as frames()."""
        rec = self._rec
        self._record_served_by()
        if rec.ttft_s is None:
            rec.ttft_s = time.monotonic() - rec.started
        rec.prompt_tokens, rec.completion_tokens = cached.prompt_tokens, cached.completion_tokens
        finished = Finished(id=0, finish_reason=cached.finish_reason, prompt_tokens=cached.prompt_tokens,
                            completion_tokens=cached.completion_tokens)
        return Collected("".join(cached.pieces), finished, [])

    def _record_served_by(self) -> None:
        worker, _ = self._served_by()
        if worker is not None:
            self._rec.worker, self._rec.served_model = worker
        self._rec.queue_s = self._queued_s()


def served_by_worker(worker) -> tuple[str, str] | None:
    return (worker.id, worker.model) if worker is not None else None


async def replay_cached(answer: CachedAnswer):
    """A cached answer as frames, at once (no artificial delays), in the pieces it first came in."""
    for piece in answer.pieces:
        yield [Tokens(id=0, token_ids=[], text=piece)]
    yield [Finished(id=0, finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens)]
