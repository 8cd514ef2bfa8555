"""The answer cache: L1 in memory (cachetools, bounded by bytes, TTL), the shared tier in Redis
when several appliances share state (shared/cache.py), and L2 on disk (diskcache, bounded by
bytes, TTL, survives restarts). Every disk call runs in one worker thread, never on the
event loop. A failing or full disk degrades to memory only - with a log line and a metric - and is
tried again a minute later; a corrupt disk tier is deleted and started anew. The client never
sees an error from the cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import sqlite3
import time
from pathlib import Path

import cachetools
import msgspec

from proxy.shared.cache import SharedCache
from proxy.shared.link import SharedUnavailable

log = logging.getLogger("fullpower.cache")
DISK_RETRY_S = 60.0
# What one memory entry costs beyond its encoded bytes (the key string, the bytes object, the
# cache's bookkeeping): ~350 bytes on CPython 3.11 (tracemalloc over 20,000 entries). The byte
# bound counts it, so that memory_bytes bounds the memory the cache really takes.
ENTRY_OVERHEAD = 350


class CachedAnswer(msgspec.Struct, array_like=True):
    pieces: list[str]  # the text deltas as first streamed, so a replayed stream keeps its shape
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    worker: str
    owner: str = ""  # the API key name that stored it (a shared cache reports hits only to it)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(CachedAnswer).decode
# The hot answers, decoded (see AnswerCache.decode): at most this many bytes, each entry charged
# four times its encoded size (the decoded pieces, and up to two pre-built bodies) plus overhead.
DECODED_MEMORY_BYTES = 8 * 1024 * 1024


class _Decoded:
    """A memory-tier entry decoded once, with what the HTTP layer pre-built from it."""

    __slots__ = ("raw", "answer", "bodies", "size")

    def __init__(self, raw: bytes, answer: CachedAnswer) -> None:
        self.raw = raw  # the memory tier's bytes object it was decoded from (identity is the check)
        self.answer = answer
        self.bodies: dict = {}  # AnswerCache.bodies: pre-built responses, keyed by their format
        self.size = 4 * len(raw) + 2 * ENTRY_OVERHEAD


class _BytesTTLCache(cachetools.TLRUCache):
    """TTL + LRU bounded by total bytes; counts evictions."""

    def __init__(self, max_bytes: int, ttl_s: float, on_evict) -> None:
        super().__init__(maxsize=max_bytes, ttu=lambda key, value, now: now + ttl_s, timer=time.monotonic,
                         getsizeof=lambda value: len(value) + ENTRY_OVERHEAD)
        self._on_evict = on_evict

    def popitem(self):
        item = super().popitem()
        self._on_evict()
        return item


class AnswerCache:
    def __init__(self, memory_bytes: int, disk_bytes: int, disk_dir: Path, ttl_s: float, metrics=None) -> None:
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.memory = _BytesTTLCache(memory_bytes, ttl_s, self._evicted) if memory_bytes else None
        self._disk_dir = disk_dir
        self._disk_bytes = disk_bytes
        self._disk = None
        self._disk_down_until = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-disk")
        self.shared: SharedCache | None = None  # the tier shared by several hosts (Redis), when configured
        # key -> _Decoded: a repeated hit skips the msgpack decode while its bytes are the same object
        self._decoded = cachetools.LRUCache(DECODED_MEMORY_BYTES, getsizeof=lambda entry: entry.size)
        self._last_decoded: _Decoded | None = None  # what `decode` gave last (`bodies` asks right after)

    def _evicted(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_evictions.labels("memory").inc()

    # --- disk, always on the executor thread ----------------------------------------------------
    def _open_disk(self):
        if self._disk is None:
            import diskcache

            self._disk_dir.mkdir(parents=True, exist_ok=True)
            self._disk = diskcache.Cache(str(self._disk_dir), size_limit=self._disk_bytes,
                                         eviction_policy="least-recently-stored", cull_limit=10)
        return self._disk

    def _repairing(self, fn, *args):
        """Run a disk call; a corrupt database (not an unwritable one) is deleted and built anew -
        it is only a cache - and the call is tried once more."""
        try:
            return fn(*args)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # locked, full, unwritable: not corruption; memory only for a while
            log.warning("disk cache %s is corrupt (%s): deleting it and starting an empty one", self._disk_dir, exc)
            if self._disk is not None:
                try:
                    self._disk.close()
                except Exception:  # noqa: BLE001 - it is being thrown away
                    pass
                self._disk = None
            shutil.rmtree(self._disk_dir, ignore_errors=True)
            return fn(*args)

    def _disk_get(self, key: str):
        return self._open_disk().get(key)

    def _disk_set(self, key: str, value: bytes) -> None:
        disk = self._open_disk()
        if not disk.set(key, value, expire=self.ttl_s):
            raise OSError("diskcache refused the entry")

    def _disk_clear(self) -> int:
        return self._open_disk().clear()

    def _disk_stats(self) -> tuple[int, int]:
        disk = self._open_disk()
        return len(disk), disk.volume()

    async def _on_disk(self, fn, *args):
        """Run a disk call off the loop; None (and memory-only for a while) if the disk fails."""
        if not self._disk_bytes or time.monotonic() < self._disk_down_until:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._repairing, fn, *args)
        except Exception as exc:  # noqa: BLE001 - sqlite3, OSError, timeouts: all mean "no disk now"
            self._disk_down_until = time.monotonic() + DISK_RETRY_S
            self._disk = None
            log.warning("disk cache unavailable (%s: %s); memory only for %.0fs", type(exc).__name__, exc,
                        DISK_RETRY_S)
            if self.metrics is not None:
                self.metrics.cache_disk_errors.inc()
            return None

    # --- API ------------------------------------------------------------------------------------
    async def get(self, key: str) -> CachedAnswer | None:
        """Memory, then the shared tier (another host's answers), then this host's disk."""
        self._last_decoded = None  # set again by `decode` when this key's answer is kept decoded
        raw = self.memory.get(key) if self.memory is not None else None
        if raw is None and self.shared is not None:
            try:
                raw = await self.shared.get(key)
            except SharedUnavailable:
                pass
            self.remember(key, raw)
        if raw is None:
            raw = await self._on_disk(self._disk_get, key)
            self.remember(key, raw)  # promote
        return self.decode(key, raw)

    def remember(self, key: str, raw: bytes | None) -> None:
        """Keep an answer in this host's memory tier, when it fits there (from the shared tier, the
        disk or a new answer)."""
        if raw is not None and self.memory is not None and len(raw) <= self.memory.maxsize:
            self.memory[key] = raw

    def decode(self, key: str, raw: bytes | None) -> CachedAnswer | None:
        if raw is None:
            return None
        kept = self._decoded.get(key)
        if kept is not None and kept.raw is raw:
            self._last_decoded = kept
            return kept.answer
        try:
            answer = _decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            # An entry from another fullpower version, or corrupt: a miss, never an error.
            log.warning("unreadable cache entry %s ignored", key[:12])
            if self.memory is not None:
                self.memory.pop(key, None)
            self._decoded.pop(key, None)
            return None
        kept = _Decoded(raw, answer)
        if kept.size <= self._decoded.maxsize:
            self._decoded[key] = kept
            self._last_decoded = kept
        return answer

    def bodies(self, key: str, answer: CachedAnswer) -> dict | None:
        """Where the HTTP layer may keep responses pre-built from `answer` (the one `get` returned
        for `key`), for as long as that decoded entry is kept; None when it is not."""
        kept = self._last_decoded  # `get` (for this key) ran just before, in the same step: no second lookup
        if kept is None or kept.answer is not answer:
            kept = self._decoded.get(key)
        return kept.bodies if kept is not None and kept.answer is answer else None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        raw = _encode(answer)
        self.remember(key, raw)
        if self.shared is not None:
            try:
                await self.shared.put(key, raw)
            except SharedUnavailable:
                pass
        await self._on_disk(self._disk_set, key, raw)

    async def clear(self) -> int:
        n = len(self.memory) if self.memory is not None else 0
        if self.memory is not None:
            self.memory.clear()
        self._decoded.clear()
        self._last_decoded = None
        if self.shared is not None:
            try:
                n += await self.shared.clear()
            except SharedUnavailable:
                log.warning("cache clear: the shared tier (Redis) is unreachable; its entries expire by their TTL")
        removed = await self._on_disk(self._disk_clear)
        return n + (removed or 0)

    async def stats(self) -> dict:
        disk = await self._on_disk(self._disk_stats)
        return {"memory_entries": len(self.memory) if self.memory is not None else 0,
                "memory_bytes": self.memory.currsize if self.memory is not None else 0,
                "disk_entries": disk[0] if disk else 0, "disk_bytes": disk[1] if disk else 0,
                "disk_available": disk is not None}

    def close(self) -> None:
        def _close():
            if self._disk is not None:
                self._disk.close()
        try:
            self._executor.submit(_close).result(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self._executor.shutdown(wait=False)
