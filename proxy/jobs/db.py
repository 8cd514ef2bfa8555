"""Durable job storage, the synchronous side: SQLite in WAL mode with synchronous=FULL, one
connection, used only from the store's one thread (store.py's JobStore is its asyncio face).

A job's result is stored once: `finish` only updates a job that is still `running` under the same
attempt, so a late duplicate (an attempt from before a crash, a cancelled run) changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    idempotency_key TEXT,
    endpoint TEXT NOT NULL,
    request TEXT NOT NULL,
    callback_url TEXT,
    metadata TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL NOT NULL,
    result TEXT,
    error TEXT,
    callback_state TEXT,
    callback_attempts INTEGER NOT NULL DEFAULT 0,
    next_callback_at REAL,
    callback_deadline REAL,
    UNIQUE (key_name, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key_name, created_at);
CREATE INDEX IF NOT EXISTS jobs_callback ON jobs (callback_state, next_callback_at);
CREATE TABLE IF NOT EXISTS callback_attempts (
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    error TEXT
);
"""

FINAL = ("succeeded", "failed", "cancelled", "expired")
COLUMNS = ("id", "key_name", "idempotency_key", "endpoint", "request", "callback_url", "metadata", "status",
           "attempts", "created_at", "updated_at", "started_at", "finished_at", "expires_at", "result", "error",
           "callback_state", "callback_attempts", "next_callback_at", "callback_deadline")


class StoreUnavailable(Exception):
    """The database cannot take writes (disk full, unwritable, corrupt)."""


def _row(row) -> dict | None:
    if row is None:
        return None
    job = dict(zip(COLUMNS, row))
    for field in ("request", "metadata", "result"):
        if job[field] is not None:
            job[field] = json.loads(job[field])
    return job


class JobDb:
    """The synchronous side; every method runs on the store's thread."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        page = self.conn.execute("PRAGMA page_size").fetchone()[0]
        if max_bytes:
            self.conn.execute(f"PRAGMA max_page_count={max(16, max_bytes // page)}")
        self.conn.executescript(SCHEMA)

    def _tx(self, fn):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self.conn)
            except BaseException:
                # SQLite may already have rolled back (SQLITE_FULL does): a second ROLLBACK would
                # fail and hide the real error, so roll back only what is still open.
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
            self.conn.execute("COMMIT")
            return result
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def create(self, key_name, idempotency_key, endpoint, request, callback_url, metadata, expires_in_s,
               callback_retry_s):
        def fn(c):
            if idempotency_key:
                row = c.execute(f"SELECT {','.join(COLUMNS)} FROM jobs WHERE key_name=? AND idempotency_key=?",
                                (key_name, idempotency_key)).fetchone()
                if row is not None:
                    return _row(row), False
            now = time.time()
            job_id = "job_" + uuid.uuid4().hex
            c.execute("INSERT INTO jobs (id, key_name, idempotency_key, endpoint, request, callback_url, metadata, "
                      "status, created_at, updated_at, expires_at, callback_state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (job_id, key_name, idempotency_key, endpoint, json.dumps(request), callback_url,
                       json.dumps(metadata) if metadata is not None else None, "queued", now, now,
                       now + expires_in_s, "none" if not callback_url else None))
            return _row(c.execute(f"SELECT {','.join(COLUMNS)} FROM jobs WHERE id=?", (job_id,)).fetchone()), True
        return self._tx(fn)

    def get(self, job_id, key_name=None):
        sql = f"SELECT {','.join(COLUMNS)} FROM jobs WHERE id=?"
        args = [job_id]
        if key_name is not None:
            sql += " AND key_name=?"
            args.append(key_name)
        return _row(self.conn.execute(sql, args).fetchone())

    def list(self, key_name, status, limit, after):
        sql = f"SELECT {','.join(COLUMNS)} FROM jobs WHERE 1=1"
        args: list = []
        if key_name is not None:
            sql += " AND key_name=?"
            args.append(key_name)
        if status:
            sql += " AND status=?"
            args.append(status)
        if after:
            sql += " AND (created_at, id) > (SELECT created_at, id FROM jobs WHERE id=?)"
            args.append(after)
        sql += " ORDER BY created_at, id LIMIT ?"
        args.append(limit)
        return [_row(r) for r in self.conn.execute(sql, args).fetchall()]

    def queued_for(self, key_name):
        return self.conn.execute("SELECT COUNT(*) FROM jobs WHERE key_name=? AND status='queued'",
                                 (key_name,)).fetchone()[0]

    def counts(self):
        return dict(self.conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def recover(self, max_attempts):
        """After a crash: running jobs go back to the queue (or fail after max_attempts)."""
        def fn(c):
            now = time.time()
            failed = c.execute("UPDATE jobs SET status='failed', error='gave up after the maximum attempts', "
                               "finished_at=?, updated_at=?, callback_state=CASE WHEN callback_url IS NULL THEN "
                               "'none' ELSE 'pending' END, next_callback_at=?, callback_deadline=NULL "
                               "WHERE status='running' AND attempts>=?", (now, now, now, max_attempts)).rowcount
            requeued = c.execute("UPDATE jobs SET status='queued', updated_at=? WHERE status='running'",
                                 (now,)).rowcount
            return requeued, failed
        return self._tx(fn)

    def claim(self, n):
        def fn(c):
            now = time.time()
            rows = c.execute(f"SELECT {','.join(COLUMNS)} FROM jobs WHERE status='queued' ORDER BY created_at, id "
                             "LIMIT ?", (n,)).fetchall()
            jobs = []
            for row in rows:
                job = _row(row)
                c.execute("UPDATE jobs SET status='running', attempts=attempts+1, started_at=?, updated_at=? "
                          "WHERE id=?", (now, now, job["id"]))
                job["status"], job["attempts"] = "running", job["attempts"] + 1
                jobs.append(job)
            return jobs
        return self._tx(fn)

    def finish(self, job_id, attempt, status, result, error, callback_retry_s):
        def fn(c):
            now = time.time()
            return c.execute(
                "UPDATE jobs SET status=?, result=?, error=?, finished_at=?, updated_at=?, "
                "callback_state=CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END, "
                "next_callback_at=?, callback_deadline=? WHERE id=? AND status='running' AND attempts=?",
                (status, json.dumps(result) if result is not None else None, error, now, now, now,
                 now + callback_retry_s, job_id, attempt)).rowcount == 1
        return self._tx(fn)

    def fail_unstored(self, job_id, attempt, error):
        """The attempt's result could not be stored: fail the job with the reason, storing
        nothing else (a small write that may still fit where the result did not)."""
        def fn(c):
            now = time.time()
            return c.execute("UPDATE jobs SET status='failed', error=?, finished_at=?, updated_at=?, "
                             "callback_state=CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END, "
                             "next_callback_at=? WHERE id=? AND status='running' AND attempts=?",
                             (error, now, now, now, job_id, attempt)).rowcount == 1
        return self._tx(fn)

    def requeue(self, job_id, attempt, count_attempt, error):
        """Back to the queue. An attempt that never ran through the job's fault (overload, shutdown)
        is not counted; a failed one is."""
        def fn(c):
            return c.execute("UPDATE jobs SET status='queued', attempts=attempts-?, error=?, updated_at=? "
                             "WHERE id=? AND status='running' AND attempts=?",
                             (0 if count_attempt else 1, error, time.time(), job_id, attempt)).rowcount == 1
        return self._tx(fn)

    def cancel(self, job_id, key_name):
        def fn(c):
            now = time.time()
            sql = ("UPDATE jobs SET status='cancelled', finished_at=?, updated_at=?, callback_state=CASE WHEN "
                   "callback_url IS NULL THEN 'none' ELSE 'pending' END, next_callback_at=?, callback_deadline=? "
                   "WHERE id=? AND status IN ('queued','running')")
            args = [now, now, now, now + 3600, job_id]
            if key_name is not None:
                sql += " AND key_name=?"
                args.append(key_name)
            return c.execute(sql, args).rowcount == 1
        return self._tx(fn)

    def retry(self, job_id):
        def fn(c):
            return c.execute("UPDATE jobs SET status='queued', error=NULL, result=NULL, finished_at=NULL, "
                             "updated_at=?, expires_at=MAX(expires_at, ?) WHERE id=? AND status IN "
                             "('failed','cancelled','expired')", (time.time(), time.time() + 3600, job_id)).rowcount == 1
        return self._tx(fn)

    def expire(self):
        def fn(c):
            now = time.time()
            return c.execute("UPDATE jobs SET status='expired', finished_at=?, updated_at=?, error='expired before "
                             "it could run', callback_state=CASE WHEN callback_url IS NULL THEN 'none' ELSE "
                             "'pending' END, next_callback_at=?, callback_deadline=? WHERE status='queued' AND "
                             "expires_at<?", (now, now, now, now + 3600, now)).rowcount
        return self._tx(fn)

    def prune(self, retention_s):
        def fn(c):
            cutoff = time.time() - retention_s
            gone = c.execute("DELETE FROM jobs WHERE status IN ('succeeded','failed','cancelled','expired') AND "
                             "finished_at<? AND callback_state IN ('none','delivered','abandoned')",
                             (cutoff,)).rowcount
            c.execute("DELETE FROM callback_attempts WHERE job_id NOT IN (SELECT id FROM jobs)")
            return gone
        return self._tx(fn)

    def callbacks_due(self, n):
        now = time.time()
        rows = self.conn.execute(f"SELECT {','.join(COLUMNS)} FROM jobs WHERE callback_state='pending' AND "
                                 "next_callback_at<=? ORDER BY next_callback_at LIMIT ?", (now, n)).fetchall()
        return [_row(r) for r in rows]

    def callback_result(self, job_id, status, error, delivered, next_at):
        def fn(c):
            now = time.time()
            c.execute("INSERT INTO callback_attempts (job_id, at, status, error) VALUES (?,?,?,?)",
                      (job_id, now, status, error))
            if delivered:
                state = "delivered"
            else:
                deadline = c.execute("SELECT callback_deadline FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
                state = "abandoned" if next_at is None or (deadline and next_at > deadline) else "pending"
            c.execute("UPDATE jobs SET callback_state=?, callback_attempts=callback_attempts+1, next_callback_at=? "
                      "WHERE id=?", (state, next_at, job_id))
            return state
        return self._tx(fn)

    def callback_attempts(self, job_id):
        return [dict(zip(("at", "status", "error"), r)) for r in self.conn.execute(
            "SELECT at, status, error FROM callback_attempts WHERE job_id=? ORDER BY at", (job_id,)).fetchall()]

    def close(self):
        self.conn.close()
