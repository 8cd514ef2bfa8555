"""Durable job storage on PostgreSQL, shared by several appliances (jobs.store: postgresql).

Same operations and semantics as the SQLite store (store.py), plus what several hosts need:
- a running job is leased to the host that claimed it (`owner`, `lease_until`, on the database's
  clock so hosts need not agree on time); the host renews its leases, and housekeeping on any host
  returns a job whose lease ran out to the queue (or fails it once its attempts are used up);
- claims take queued rows with FOR UPDATE SKIP LOCKED, so hosts never claim the same job;
- a new job is announced with NOTIFY, so runners on every host wake at once (LISTEN);
- a due callback is claimed for a while before it is sent, so one host sends it at a time; its
  body is the stored row, and a result is stored once (`finish` only moves a job that is still
  running under the same attempt), so no two deliveries can carry different results.

asyncpg (the fastest maintained asyncio driver, with its own pool and LISTEN support) rather than
a hand-written protocol. The schema is versioned and migrated at open (pg_schema.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from proxy.jobs.db import COLUMNS, StoreUnavailable
from proxy.jobs.pg_schema import migrate, redacted

log = logging.getLogger("fullpower.jobs")
CHANNEL = "fullpower_jobs"
_COLS = ",".join(COLUMNS)
NOW = "extract(epoch from clock_timestamp())"  # the database's clock: one clock for every host's leases
CALLBACK_STATE = "CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END"


def _row(record) -> dict | None:
    if record is None:
        return None
    job = {c: record[c] for c in COLUMNS}
    for field in ("request", "metadata", "result"):
        if job[field] is not None:
            job[field] = json.loads(job[field])
    return job


class PgJobStore:
    """The PostgreSQL job store; every operation is one statement or one short transaction."""

    leased = True  # running jobs hold leases that the runner must renew

    def __init__(self, dsn: str, host_id: str, lease_s: float, connect_timeout_s: float = 5.0) -> None:
        self.dsn, self.host_id, self.lease_s = dsn, host_id, lease_s
        self.max_bytes = 0  # jobs.max_db_bytes: new jobs are refused while the tables are larger
        self.size_bytes = 0  # fullpower's tables on disk, as housekeeping last measured them
        self.connect_timeout_s = connect_timeout_s
        self.on_job_queued = None  # called when any host queues a job (LISTEN)
        # A claimed callback is not due again for this long: its sender reports sooner (the
        # callback timeout), unless its host died - then another host sends it after this.
        self.callback_hold_s = 15.0
        self._pool = None
        self._listener = None  # the connection that LISTENs

    def reconfigure(self, max_bytes: int, callback_timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self.callback_hold_s = callback_timeout_s + 5.0  # its sender reports well inside this

    def describe(self) -> str:
        return f"PostgreSQL {redacted(self.dsn)}"

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def forget(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=8, timeout=self.connect_timeout_s,
                                                   command_timeout=10.0)
            async with self._pool.acquire() as conn:
                await migrate(conn)
            self._listener = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
            await self._listener.add_listener(CHANNEL, self._notified)
        except StoreUnavailable:
            self.forget()
            raise
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.forget()
            raise StoreUnavailable(f"{self.describe()}: {type(exc).__name__}: {exc}") from None

    def _notified(self, *_args) -> None:
        if self.on_job_queued is not None:
            self.on_job_queued()

    async def _run(self, fn):
        """fn(conn) on a pooled connection; any driver or network error becomes StoreUnavailable."""
        import asyncpg

        if self._pool is None:
            raise StoreUnavailable("the job database is not open")
        if self._listener is not None and self._listener.is_closed():
            # The LISTEN connection died (database restarted): reopen on the next housekeeping round.
            self.forget()
            raise StoreUnavailable(f"{self.describe()}: connection lost")
        try:
            async with self._pool.acquire(timeout=self.connect_timeout_s) as conn:
                return await fn(conn)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def _tx(self, fn):
        async def in_tx(conn):
            async with conn.transaction():
                return await fn(conn)
        return await self._run(in_tx)

    # --- the JobStore operations ----------------------------------------------------------------
    async def measure(self) -> int:
        """The size of fullpower's tables (with indexes and TOAST), for jobs.max_db_bytes."""
        self.size_bytes = await self._run(lambda conn: conn.fetchval(
            "SELECT pg_total_relation_size('jobs') + pg_total_relation_size('callback_attempts')"))
        return self.size_bytes

    async def create(self, key_name, idempotency_key, endpoint, request, callback_url, metadata, expires_in_s,
                     callback_retry_s):
        if self.max_bytes and self.size_bytes > self.max_bytes:
            raise StoreUnavailable(f"the job tables take {self.size_bytes} bytes, more than jobs.max_db_bytes "
                                   f"({self.max_bytes})")

        async def fn(conn):
            now = time.time()
            record = await conn.fetchrow(
                f"INSERT INTO jobs (id, key_name, idempotency_key, endpoint, request, callback_url, metadata, status, "
                f"created_at, updated_at, expires_at, callback_state) VALUES ($1,$2,$3,$4,$5,$6,$7,'queued',$8,$8,$9,"
                f"$10) ON CONFLICT (key_name, idempotency_key) DO NOTHING RETURNING {_COLS}",
                "job_" + uuid.uuid4().hex, key_name, idempotency_key, endpoint, json.dumps(request), callback_url,
                json.dumps(metadata) if metadata is not None else None, now, now + expires_in_s,
                "none" if not callback_url else None)
            if record is None:  # the idempotency key names a job some host already created
                return _row(await conn.fetchrow(f"SELECT {_COLS} FROM jobs WHERE key_name=$1 AND idempotency_key=$2",
                                                key_name, idempotency_key)), False
            await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
            return _row(record), True
        return await self._tx(fn)

    async def get(self, job_id, key_name=None):
        async def fn(conn):
            if key_name is None:
                return _row(await conn.fetchrow(f"SELECT {_COLS} FROM jobs WHERE id=$1", job_id))
            return _row(await conn.fetchrow(f"SELECT {_COLS} FROM jobs WHERE id=$1 AND key_name=$2", job_id, key_name))
        return await self._run(fn)

    async def list(self, key_name, status, limit, after):
        sql, args = f"SELECT {_COLS} FROM jobs WHERE TRUE", []
        if key_name is not None:
            args.append(key_name)
            sql += f" AND key_name=${len(args)}"
        if status:
            args.append(status)
            sql += f" AND status=${len(args)}"
        if after:
            args.append(after)
            sql += f" AND (created_at, id) > (SELECT created_at, id FROM jobs WHERE id=${len(args)})"
        args.append(limit)
        sql += f" ORDER BY created_at, id LIMIT ${len(args)}"
        return await self._run(lambda conn: _rows(conn.fetch(sql, *args)))

    async def queued_for(self, key_name):
        return await self._run(lambda conn: conn.fetchval(
            "SELECT COUNT(*) FROM jobs WHERE key_name=$1 AND status='queued'", key_name))

    async def counts(self):
        async def fn(conn):
            return {r["status"]: r["n"] for r in await conn.fetch("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
        return await self._run(fn)

    async def recover(self, max_attempts):
        """At start: this host's own running jobs (from before its restart) are not running any
        more; other hosts' jobs are left to their leases."""
        return await self._release("owner = {owner}", max_attempts, self.host_id)

    async def reclaim_expired(self, max_attempts):
        """Jobs whose host stopped renewing their lease: back to the queue, or failed when their
        attempts are used up. Any host may run this; row locks make it safe to race."""
        return await self._release(f"lease_until < {NOW}", max_attempts)

    async def _release(self, condition: str, max_attempts: int, owner: str | None = None):
        """Running jobs matching `condition` ({owner} = the owner parameter): failed when their
        attempts are used up, else back to the queue. Returns (requeued, failed)."""
        async def fn(conn):
            now = time.time()
            extra = (owner,) if owner is not None else ()
            failed = await conn.fetch(
                f"UPDATE jobs SET status='failed', error='gave up after the maximum attempts', finished_at=$2, "
                f"updated_at=$2, owner=NULL, lease_until=NULL, callback_state={CALLBACK_STATE}, next_callback_at=$2, "
                f"callback_deadline=NULL WHERE status='running' AND attempts>=$1 AND "
                f"{condition.format(owner='$3')} RETURNING id", max_attempts, now, *extra)
            requeued = await conn.fetch(
                f"UPDATE jobs SET status='queued', owner=NULL, lease_until=NULL, updated_at=$1 WHERE "
                f"status='running' AND {condition.format(owner='$2')} RETURNING id", now, *extra)
            if requeued:
                await conn.execute(f"NOTIFY {CHANNEL}")
            return len(requeued), len(failed)
        return await self._tx(fn)

    async def claim(self, n):
        async def fn(conn):
            now = time.time()
            return _rows_now(await conn.fetch(
                f"UPDATE jobs SET status='running', attempts=attempts+1, started_at=$2, updated_at=$2, owner=$3, "
                f"lease_until={NOW} + $4 WHERE id IN (SELECT id FROM jobs WHERE status='queued' "
                f"ORDER BY created_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING {_COLS}",
                n, now, self.host_id, self.lease_s))
        return await self._tx(fn)

    async def renew(self, attempts: dict[str, int]) -> list[str]:
        """Extend this host's leases on its running jobs; returns the job ids whose lease is lost
        (taken over, cancelled or finished elsewhere): their attempts must stop."""
        if not attempts:
            return []
        ids = list(attempts)
        async def fn(conn):
            kept = await conn.fetch(
                f"UPDATE jobs SET lease_until={NOW} + $3 WHERE id = ANY($1::text[]) AND owner=$2 AND "
                f"status='running' RETURNING id, attempts", ids, self.host_id, self.lease_s)
            held = {r["id"] for r in kept if r["attempts"] == attempts[r["id"]]}
            return [i for i in ids if i not in held]
        return await self._run(fn)

    async def finish(self, job_id, attempt, status, result, error, callback_retry_s):
        async def fn(conn):
            now = time.time()
            done = await conn.execute(
                f"UPDATE jobs SET status=$1, result=$2, error=$3, finished_at=$4, updated_at=$4, owner=NULL, "
                f"lease_until=NULL, callback_state={CALLBACK_STATE}, next_callback_at=$4, callback_deadline=$5 "
                f"WHERE id=$6 AND status='running' AND attempts=$7",
                status, json.dumps(result) if result is not None else None, error, now, now + callback_retry_s,
                job_id, attempt)
            return done == "UPDATE 1"
        return await self._run(fn)

    async def fail_unstored(self, job_id, attempt, error):
        async def fn(conn):
            now = time.time()
            done = await conn.execute(
                f"UPDATE jobs SET status='failed', error=$1, finished_at=$2, updated_at=$2, owner=NULL, "
                f"lease_until=NULL, callback_state={CALLBACK_STATE}, next_callback_at=$2 WHERE id=$3 AND "
                f"status='running' AND attempts=$4", error, now, job_id, attempt)
            return done == "UPDATE 1"
        return await self._run(fn)

    async def requeue(self, job_id, attempt, count_attempt, error):
        async def fn(conn):
            done = await conn.execute(
                "UPDATE jobs SET status='queued', attempts=attempts-$1, error=$2, updated_at=$3, owner=NULL, "
                "lease_until=NULL WHERE id=$4 AND status='running' AND attempts=$5",
                0 if count_attempt else 1, error, time.time(), job_id, attempt)
            if done == "UPDATE 1":
                await conn.execute(f"NOTIFY {CHANNEL}")
                return True
            return False
        return await self._tx(fn)

    async def cancel(self, job_id, key_name):
        async def fn(conn):
            now = time.time()
            sql = (f"UPDATE jobs SET status='cancelled', finished_at=$1, updated_at=$1, owner=NULL, lease_until=NULL, "
                   f"callback_state={CALLBACK_STATE}, next_callback_at=$1, callback_deadline=$2 WHERE id=$3 AND "
                   f"status IN ('queued','running')")
            args = [now, now + 3600, job_id]
            if key_name is not None:
                sql += " AND key_name=$4"
                args.append(key_name)
            return await conn.execute(sql, *args) == "UPDATE 1"
        return await self._run(fn)

    async def retry(self, job_id):
        async def fn(conn):
            now = time.time()
            done = await conn.execute(
                "UPDATE jobs SET status='queued', error=NULL, result=NULL, finished_at=NULL, updated_at=$1, "
                "expires_at=GREATEST(expires_at, $2) WHERE id=$3 AND status IN ('failed','cancelled','expired')",
                now, now + 3600, job_id)
            if done == "UPDATE 1":
                await conn.execute(f"NOTIFY {CHANNEL}")
                return True
            return False
        return await self._tx(fn)

    async def expire(self):
        async def fn(conn):
            now = time.time()
            done = await conn.execute(
                f"UPDATE jobs SET status='expired', finished_at=$1, updated_at=$1, error='expired before it could "
                f"run', callback_state={CALLBACK_STATE}, next_callback_at=$1, callback_deadline=$2 WHERE "
                f"status='queued' AND expires_at<$1", now, now + 3600)
            return int(done.split()[-1])
        return await self._run(fn)

    async def prune(self, retention_s):
        async def fn(conn):
            done = await conn.execute(
                "DELETE FROM jobs WHERE status IN ('succeeded','failed','cancelled','expired') AND finished_at<$1 AND "
                "callback_state IN ('none','delivered','abandoned')", time.time() - retention_s)
            await conn.execute("DELETE FROM callback_attempts a WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE "
                               "j.id = a.job_id)")
            return int(done.split()[-1])
        return await self._tx(fn)

    async def callbacks_due(self, n):
        """Due callbacks, claimed for callback_hold_s so no other host sends them meanwhile."""
        async def fn(conn):
            now = time.time()
            return _rows_now(await conn.fetch(
                f"UPDATE jobs SET next_callback_at=$2 WHERE id IN (SELECT id FROM jobs WHERE callback_state='pending' "
                f"AND next_callback_at<=$1 ORDER BY next_callback_at LIMIT $3 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_COLS}", now, now + self.callback_hold_s, n))
        return await self._tx(fn)

    async def callback_result(self, job_id, status, error, delivered, next_at):
        async def fn(conn):
            now = time.time()
            await conn.execute("INSERT INTO callback_attempts (job_id, at, status, error) VALUES ($1,$2,$3,$4)",
                               job_id, now, status, error)
            if delivered:
                state = "delivered"
            else:
                deadline = await conn.fetchval("SELECT callback_deadline FROM jobs WHERE id=$1", job_id)
                state = "abandoned" if next_at is None or (deadline and next_at > deadline) else "pending"
            await conn.execute("UPDATE jobs SET callback_state=$1, callback_attempts=callback_attempts+1, "
                               "next_callback_at=$2 WHERE id=$3", state, next_at, job_id)
            return state
        return await self._tx(fn)

    async def callback_attempts(self, job_id):
        async def fn(conn):
            return [{"at": r["at"], "status": r["status"], "error": r["error"]} for r in await conn.fetch(
                "SELECT at, status, error FROM callback_attempts WHERE job_id=$1 ORDER BY at", job_id)]
        return await self._run(fn)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        for closing in (listener, pool):
            if closing is not None:
                try:
                    await asyncio.wait_for(closing.close(), 5.0)
                except Exception:  # noqa: BLE001 - closing at stop; a dead server is fine
                    closing.terminate()


async def _rows(fetching) -> list[dict]:
    return [_row(r) for r in await fetching]


def _rows_now(records) -> list[dict]:
    return sorted((_row(r) for r in records), key=lambda job: (job["created_at"], job["id"]))
