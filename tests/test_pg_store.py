"""The PostgreSQL job store on a real PostgreSQL (a database of its own per test): claims never
overlap between hosts, idempotency keys are fleet-wide, leases are renewed, lost and reclaimed, a
stale attempt stores nothing, wake-ups cross hosts, and the schema is versioned."""

from __future__ import annotations

import asyncio

import pytest

from proxy.jobs.db import StoreUnavailable
from proxy.jobs.pg import PgJobStore
from proxy.jobs.pg_schema import SCHEMA_VERSION
from tests.fleet import Database


@pytest.fixture
def database():
    db = Database()
    yield db
    db.drop()


async def stores(dsn: str, n: int, lease_s: float = 3.0) -> list[PgJobStore]:
    opened = [PgJobStore(dsn, f"host-{i}", lease_s) for i in range(n)]
    await asyncio.gather(*(s.open() for s in opened))  # concurrent first opens: one migrates, none fails
    return opened


async def new_job(store: PgJobStore, key: str | None = None, name: str = "k") -> dict:
    job, _ = await store.create(name, key, "/v1/completions", {"prompt": "x"}, None, None, 3600, 3600)
    return job


def test_hosts_claiming_at_once_never_claim_the_same_job(database):
    async def run():
        hosts = await stores(database.dsn, 4)
        for _ in range(200):
            await new_job(hosts[0])
        claimed: list[str] = []

        async def claim_all(store):
            while batch := await store.claim(7):
                claimed.extend(job["id"] for job in batch)

        await asyncio.gather(*(claim_all(h) for h in hosts))
        await asyncio.gather(*(h.aclose() for h in hosts))
        return claimed

    claimed = asyncio.run(run())
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_idempotency_key_names_one_job_across_hosts_and_new_jobs_wake_every_host(database):
    async def run():
        a, b = await stores(database.dsn, 2)
        woke = asyncio.Event()
        b.on_job_queued = woke.set
        first = await new_job(a, "order-1")
        await asyncio.wait_for(woke.wait(), 5)  # NOTIFY from a reached b's LISTEN
        again, created = await b.create("k", "order-1", "/v1/completions", {"prompt": "other"}, None, None, 3600, 3600)
        other_key, _ = await b.create("other", "order-1", "/v1/completions", {"prompt": "x"}, None, None, 3600, 3600)
        await asyncio.gather(a.aclose(), b.aclose())
        return first, again, created, other_key

    first, again, created, other_key = asyncio.run(run())
    assert not created and again["id"] == first["id"] and again["request"] == {"prompt": "x"}
    assert other_key["id"] != first["id"]  # unique per API key, not globally


def test_a_lease_not_renewed_returns_the_job_and_the_old_attempt_stores_nothing(database):
    async def run():
        a, b = await stores(database.dsn, 2, lease_s=3.0)
        job = await new_job(a)
        [mine] = await a.claim(1)
        assert await a.renew({job["id"]: 1}) == []  # still a's
        assert await b.renew({job["id"]: 1}) == [job["id"]]  # b holds no such lease
        assert await b.reclaim_expired(3) == (0, 0)  # not expired yet
        await asyncio.sleep(3.3)
        assert await b.reclaim_expired(3) == (1, 0)
        [taken] = await b.claim(1)
        assert await a.renew({job["id"]: 1}) == [job["id"]]  # a learns it lost the job
        stale = await a.finish(job["id"], mine["attempts"], "succeeded", {"from": "a"}, None, 3600)
        fresh = await b.finish(job["id"], taken["attempts"], "succeeded", {"from": "b"}, None, 3600)
        final = await a.get(job["id"])
        await asyncio.gather(a.aclose(), b.aclose())
        return taken, stale, fresh, final

    taken, stale, fresh, final = asyncio.run(run())
    assert taken["attempts"] == 2 and not stale and fresh
    assert final["status"] == "succeeded" and final["result"] == {"from": "b"}


def test_attempts_used_up_when_a_lease_runs_out_fail_the_job(database):
    async def run():
        [a] = await stores(database.dsn, 1, lease_s=3.0)
        job = await new_job(a)
        await a.claim(1)
        await asyncio.sleep(3.3)
        result = await a.reclaim_expired(1)
        final = await a.get(job["id"])
        await a.aclose()
        return result, final

    result, final = asyncio.run(run())
    assert result == (0, 1) and final["status"] == "failed" and "maximum attempts" in final["error"]


def test_a_restarted_host_requeues_only_its_own_running_jobs(database):
    async def run():
        a, b = await stores(database.dsn, 2)
        await new_job(a)
        await new_job(a)
        await a.claim(1)
        await b.claim(1)
        restarted = PgJobStore(database.dsn, "host-0", 3.0)  # host-0 again, after a restart
        await restarted.open()
        requeued = await restarted.recover(3)
        counts = await restarted.counts()
        await asyncio.gather(a.aclose(), b.aclose(), restarted.aclose())
        return requeued, counts

    requeued, counts = asyncio.run(run())
    assert requeued == (1, 0) and counts == {"queued": 1, "running": 1}


def test_a_database_with_a_newer_schema_is_refused_with_the_reason(database):
    database.query("CREATE TABLE fullpower_schema (version INTEGER NOT NULL); "
                   f"INSERT INTO fullpower_schema VALUES ({SCHEMA_VERSION + 1})")

    async def run():
        store = PgJobStore(database.dsn, "h", 3.0)
        with pytest.raises(StoreUnavailable, match="newer than this fullpower knows"):
            await store.open()
        assert not store.is_open

    asyncio.run(run())


def test_an_unreachable_database_is_named_without_its_password():
    async def run():
        store = PgJobStore("postgresql://fp:secret@127.0.0.1:1/none", "h", 3.0, connect_timeout_s=2)
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        return str(info.value)

    message = asyncio.run(run())
    assert "postgresql://fp:***@127.0.0.1:1/none" in message and "secret" not in message


def test_new_jobs_are_refused_beyond_max_db_bytes(database):
    async def run():
        [a] = await stores(database.dsn, 1)
        await new_job(a)
        a.max_bytes = 1  # any table is larger
        assert await a.measure() > 1
        with pytest.raises(StoreUnavailable, match="jobs.max_db_bytes"):
            await new_job(a)
        a.max_bytes = 0
        await new_job(a)
        await a.aclose()

    asyncio.run(run())
