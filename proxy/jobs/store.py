"""Durable job storage, the asyncio side: every call runs the matching JobDb method on the
store's single thread, off the event loop; an SQLite error becomes StoreUnavailable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from pathlib import Path

from proxy.jobs.db import FINAL, JobDb, StoreUnavailable

__all__ = ["FINAL", "JobStore", "StoreUnavailable"]


class JobStore:
    """The asyncio face of the database: every call runs on the store's single thread."""

    leased = False  # one host: a running job is this host's until it restarts (recover)
    on_job_queued = None  # only a shared store announces other hosts' jobs

    def __init__(self, path: Path, max_bytes: int = 0) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        self._path, self._max_bytes = path, max_bytes
        self._db: JobDb | None = None

    async def open(self) -> None:
        def _open():
            self._db = JobDb(self._path, self._max_bytes)
        try:
            await self._call(_open)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    def describe(self) -> str:
        return f"SQLite {self._path}"

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def forget(self) -> None:
        self._db = None

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _db_call(self, method, *args):
        """Run one JobDb method on the store's thread; any SQLite error becomes StoreUnavailable."""
        if self._db is None:
            raise StoreUnavailable("the job database is not open")
        try:
            return await self._call(method, self._db, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def create(self, *args):
        return await self._db_call(JobDb.create, *args)

    async def get(self, *args):
        return await self._db_call(JobDb.get, *args)

    async def list(self, *args):
        return await self._db_call(JobDb.list, *args)

    async def queued_for(self, *args):
        return await self._db_call(JobDb.queued_for, *args)

    async def counts(self, *args):
        return await self._db_call(JobDb.counts, *args)

    async def recover(self, *args):
        return await self._db_call(JobDb.recover, *args)

    async def claim(self, *args):
        return await self._db_call(JobDb.claim, *args)

    async def finish(self, *args):
        return await self._db_call(JobDb.finish, *args)

    async def fail_unstored(self, *args):
        return await self._db_call(JobDb.fail_unstored, *args)

    async def requeue(self, *args):
        return await self._db_call(JobDb.requeue, *args)

    async def cancel(self, *args):
        return await self._db_call(JobDb.cancel, *args)

    async def retry(self, *args):
        return await self._db_call(JobDb.retry, *args)

    async def expire(self, *args):
        return await self._db_call(JobDb.expire, *args)

    async def prune(self, *args):
        return await self._db_call(JobDb.prune, *args)

    async def callbacks_due(self, *args):
        return await self._db_call(JobDb.callbacks_due, *args)

    async def callback_result(self, *args):
        return await self._db_call(JobDb.callback_result, *args)

    async def callback_attempts(self, *args):
        return await self._db_call(JobDb.callback_attempts, *args)

    async def reclaim_expired(self, max_attempts):
        return 0, 0  # no leases on one host

    async def measure(self) -> int:
        return 0  # SQLite bounds itself (max_page_count)

    async def renew(self, attempts: dict[str, int]) -> list[str]:
        return []

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)
        self._executor.shutdown(wait=False)
