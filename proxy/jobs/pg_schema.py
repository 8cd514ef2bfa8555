"""The PostgreSQL job store's schema: its versioned migrations and the step that applies them
(one host at a time, under an advisory lock), and how a DSN is shown in logs."""

from __future__ import annotations

import logging
import urllib.parse

from proxy.jobs.db import StoreUnavailable

log = logging.getLogger("fullpower.jobs")
MIGRATION_LOCK = 0x66756C6C  # pg_advisory_xact_lock key: one host migrates at a time

# (version, statements): applied in order, each in one transaction; never edit a released one.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    idempotency_key TEXT,
    endpoint TEXT NOT NULL,
    request TEXT NOT NULL,
    callback_url TEXT,
    metadata TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    expires_at DOUBLE PRECISION NOT NULL,
    result TEXT,
    error TEXT,
    callback_state TEXT,
    callback_attempts INTEGER NOT NULL DEFAULT 0,
    next_callback_at DOUBLE PRECISION,
    callback_deadline DOUBLE PRECISION,
    owner TEXT,
    lease_until DOUBLE PRECISION,
    UNIQUE (key_name, idempotency_key)
);
CREATE INDEX jobs_status ON jobs (status, created_at, id);
CREATE INDEX jobs_key ON jobs (key_name, created_at);
CREATE INDEX jobs_callback ON jobs (callback_state, next_callback_at);
CREATE INDEX jobs_lease ON jobs (lease_until) WHERE status = 'running';
CREATE TABLE callback_attempts (
    job_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    status INTEGER,
    error TEXT
);
CREATE INDEX callback_attempts_job ON callback_attempts (job_id, at);
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def redacted(dsn: str) -> str:
    """The DSN without its password, for log lines and errors."""
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def migrate(conn) -> int:
    """Bring the schema to SCHEMA_VERSION (one host at a time); refuse a newer schema."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS fullpower_schema (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM fullpower_schema") or 0
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(f"the job database's schema is version {version}, newer than this fullpower "
                                   f"knows ({SCHEMA_VERSION}); upgrade fullpower on this host")
        for number, statements in MIGRATIONS:
            if number > version:
                await conn.execute(statements)
                await conn.execute("INSERT INTO fullpower_schema (version) VALUES ($1)", number)
                log.info("job database migrated to schema version %d", number)
                version = number
    return version
