"""Async jobs: the operations the HTTP surface offers (submit, read, list, cancel, retry) and the
lifecycle of the background loops - the runner, the callback sender, housekeeping and (with a
shared store) lease renewal. Job state lives in the store (JobStore on SQLite, PgJobStore on
PostgreSQL); this module owns the loops' tasks and nothing else."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import msgspec

from proxy.config import ApiKey
from proxy.config import Jobs as JobsSettings
from proxy.errors import ApiError, Forbidden, InvalidRequest, NotFound, Overloaded
from proxy.jobs.callbacks import CallbackSender
from proxy.jobs.pg import PgJobStore
from proxy.jobs.runner import ENDPOINTS, JobRunner
from proxy.jobs.store import FINAL, JobStore, StoreUnavailable
from proxy.metrics import Metrics
from proxy.serving.auth import ANONYMOUS, Authenticator, Principal
from proxy.serving.core import ServingCore
from proxy.serving.openai_types import parse
from proxy.serving.plan import Planner

log = logging.getLogger("fullpower.jobs")
STATUSES = ("queued", "running") + FINAL
MAX_NESTING = 64  # JSON depth of a job's request and metadata (deeper is refused, never a crash)
PAGE_SIZE_MAX = 100


def _depth(value, limit: int = MAX_NESTING) -> int:
    """Nesting depth of decoded JSON, counted without recursion (stops once past `limit`)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


class JobSubmission(msgspec.Struct, forbid_unknown_fields=True):
    request: dict
    endpoint: str = "/v1/chat/completions"
    callback_url: str | None = None
    metadata: dict | None = None


class StoreDown(ApiError):
    status = 503
    type = "server_error"
    code = "job_store_unavailable"


def public(job: dict) -> dict:
    """The job as clients and callbacks see it."""
    return {"id": job["id"], "object": "job", "status": job["status"], "endpoint": job["endpoint"],
            "created_at": job["created_at"], "started_at": job["started_at"], "finished_at": job["finished_at"],
            "expires_at": job["expires_at"], "attempts": job["attempts"], "metadata": job["metadata"],
            "result": job["result"], "error": job["error"]}


class JobService:
    def __init__(self, settings: JobsSettings, db_path: Path, jobs_tier: str, keys: list[ApiKey],
                 own_listeners: list[tuple[str, int]], auth: Authenticator, planner: Planner, core: ServingCore,
                 metrics: Metrics, host_id: str = "") -> None:
        self.own_listeners = own_listeners  # (host, port) of our listeners: never a callback target
        self.rate_limit = core.rate_limit  # a submission is a request: the key's requests_per_second
        self.metrics = metrics
        if settings.store == "postgresql":
            self.store = PgJobStore(settings.dsn, host_id, settings.lease_s)
        else:
            self.store = JobStore(db_path, settings.max_db_bytes)
        self.runner = JobRunner(self.store, auth, planner, core, metrics)
        self.store.on_job_queued = self.runner.wake.set  # another host queued a job
        self.callbacks = CallbackSender(self.store, metrics, public)
        self.runner.on_finished = self.callbacks.wake.set
        self.counts: dict[str, int] = {}
        self.oldest_queued_s = 0.0
        self._tasks: list[asyncio.Task] = []
        self.reconfigure(settings, jobs_tier, keys)

    def reconfigure(self, settings: JobsSettings, jobs_tier: str, keys: list[ApiKey]) -> None:
        self.settings = settings
        self.runner.reconfigure(jobs_tier, settings.concurrency, settings.max_attempts, settings.callback_retry_s)
        if isinstance(self.store, PgJobStore):  # SQLite takes its size bound once, at open
            self.store.reconfigure(settings.max_db_bytes, settings.callback_timeout_s)
        self.callbacks.reconfigure(settings.callback_allow, self.own_listeners,
                                   {k.name: k.callback_secret for k in keys if k.callback_secret},
                                   settings.callback_timeout_s)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._open()
        self._tasks = [asyncio.create_task(self.runner.run(), name="jobs runner"),
                       asyncio.create_task(self.callbacks.run(), name="jobs callbacks"),
                       asyncio.create_task(self._housekeeping(), name="jobs housekeeping")]
        if self.store.leased:
            self._tasks.append(asyncio.create_task(self.runner.keep_leases(self.settings.lease_s), name="job leases"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.stop()  # running jobs go back to the queue
        await self.store.aclose()

    async def _open(self) -> bool:
        """Open the database and recover jobs left running by a crash. An unusable database does
        not stop the appliance: job calls get 503 and opening is tried again every few seconds."""
        if self.store.is_open:
            return True
        try:
            await self.store.open()
            requeued, failed = await self.store.recover(self.settings.max_attempts)
        except (StoreUnavailable, OSError, sqlite3.Error) as exc:
            log.error("job store %s unusable (%s); new jobs get 503 until it works", self.store.describe(), exc)
            self.store.forget()
            return False
        if requeued or failed:
            log.warning("recovered jobs after a restart: %d back in the queue, %d failed (attempts used up)",
                        requeued, failed)
        return True

    # --- operations -----------------------------------------------------------------------------
    def check_tenant(self, principal: Principal, listing: bool = False) -> None:
        """Anonymous callers are one tenant: no jobs unless jobs.allow_anonymous, and even then
        nothing that would show one anonymous caller another's jobs (listing, idempotency keys)."""
        if principal.key_name != ANONYMOUS:
            return
        if not self.settings.allow_anonymous:
            raise Forbidden("Jobs need an API key (anonymous access to jobs is off: jobs.allow_anonymous).")
        if listing:
            raise Forbidden("Anonymous callers cannot list jobs; fetch a job by its id.")

    async def submit(self, principal: Principal, body: bytes, idempotency_key: str | None) -> tuple[dict, bool]:
        """(the job, created) - created is False when the idempotency key named an existing job."""
        self.check_tenant(principal)
        if idempotency_key is not None and principal.key_name == ANONYMOUS:
            raise InvalidRequest("Anonymous callers cannot use Idempotency-Key (it would be shared by all of "
                                 "them); use an API key.", param="Idempotency-Key")
        try:
            sub = msgspec.json.decode(body, type=JobSubmission)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"Invalid job: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("The job is nested too deeply.") from None
        for field, value in (("request", sub.request), ("metadata", sub.metadata)):
            if _depth(value) > MAX_NESTING:
                raise InvalidRequest(f"{field} is nested deeper than {MAX_NESTING} levels.", param=field)
        if sub.metadata is not None and len(msgspec.json.encode(sub.metadata)) > self.settings.max_metadata_bytes:
            raise InvalidRequest(f"metadata is larger than {self.settings.max_metadata_bytes} bytes as JSON.",
                                 param="metadata")
        kind = ENDPOINTS.get(sub.endpoint)
        if kind is None:
            raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        request_body = {**sub.request, "stream": False}
        request_body.pop("stream_options", None)
        parse(msgspec.json.encode(request_body), kind)  # a bad request fails now, not hours later
        if sub.callback_url:
            if principal.key_name not in self.callbacks.secrets:
                raise InvalidRequest("This API key has no callback_secret configured; callbacks are signed with it.",
                                     param="callback_url")
            await self.callbacks.policy.check(sub.callback_url)
        if idempotency_key is not None and len(idempotency_key) > 255:
            raise InvalidRequest("Idempotency-Key is longer than 255 characters.", param="Idempotency-Key")
        s = self.settings
        await self.rate_limit(principal.key_name, principal.tier)
        queued = await self._read(self.store.queued_for, principal.key_name)
        if queued >= s.max_queued_per_key:
            raise Overloaded(f"This API key already has {queued} jobs waiting (jobs.max_queued_per_key); "
                             "retry when some have run.", code="too_many_jobs", retry_after=30)
        try:
            job, created = await self.store.create(principal.key_name, idempotency_key, sub.endpoint, request_body,
                                                   sub.callback_url, sub.metadata, s.expire_after_s,
                                                   s.callback_retry_s)
        except StoreUnavailable as exc:
            log.error("job store refused a new job: %s", exc)
            raise StoreDown("Jobs cannot be accepted right now (job storage unavailable); retry later.",
                            retry_after=30) from None
        if created:
            self.runner.wake.set()
        return job, created

    async def get(self, job_id: str, key_name: str | None) -> dict:
        """The job row; key_name None (admin) reads any key's job."""
        job = await self._read(self.store.get, job_id, key_name)
        if job is None:
            raise NotFound("No such job.", code="job_not_found")
        return job

    async def list(self, key_name: str | None, status: str | None, limit: int, after: str | None) -> list[dict]:
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}.", param="status")
        return await self._read(self.store.list, key_name, status, limit, after)

    async def cancel(self, job_id: str, key_name: str | None) -> dict:
        try:
            cancelled = await self.store.cancel(job_id, key_name)
        except StoreUnavailable as exc:
            raise StoreDown(f"Job storage unavailable: {exc}", retry_after=30) from None
        job = await self.get(job_id, key_name)
        if cancelled:
            self.runner.cancel(job_id)
        elif job["status"] != "cancelled":
            raise InvalidRequest(f"The job is already {job['status']}.", code="job_finished")
        return job

    async def retry(self, job_id: str) -> dict:
        if not await self._read(self.store.retry, job_id):
            raise InvalidRequest("Only failed, cancelled or expired jobs can be retried.")
        self.runner.wake.set()
        return await self.get(job_id, None)

    async def callback_attempts(self, job_id: str) -> list[dict]:
        return await self._read(self.store.callback_attempts, job_id)

    async def _read(self, fn, *args):
        try:
            return await fn(*args)
        except StoreUnavailable as exc:
            raise StoreDown(f"Job storage unavailable: {exc}", retry_after=30) from None

    # --- housekeeping ---------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        while True:
            if not await self._open():
                await asyncio.sleep(5.0)
                continue
            try:
                requeued, failed = await self.store.reclaim_expired(self.settings.max_attempts)
                if requeued or failed:
                    log.warning("jobs whose host stopped renewing their lease: %d back in the queue, %d failed "
                                "(attempts used up)", requeued, failed)
                    self.runner.wake.set()
                expired = await self.store.expire()
                if expired:
                    log.warning("%d queued jobs expired before they could run", expired)
                    self.metrics.jobs_finished.labels("expired").inc(expired)
                await self.store.prune(self.settings.retention_s)
                await self.store.measure()
                self.counts = await self.store.counts()
                oldest = await self.store.list(None, "queued", 1, None)
                self.oldest_queued_s = time.time() - oldest[0]["created_at"] if oldest else 0.0
            except StoreUnavailable as exc:
                log.error("job housekeeping: %s", exc)
            await asyncio.sleep(1.0)
