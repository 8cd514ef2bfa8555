"""Async jobs: the HTTP API, the runner that executes queued jobs through the normal request path
at a low tier, and the sender of signed callbacks. State lives in JobStore (SQLite); this module
owns the two background tasks and nothing else."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import sqlite3
import time
import urllib.parse

import aiohttp
import msgspec
from aiohttp import web

from proxy.serving.auth import ANONYMOUS
from proxy.config import Config, parse_host_port
from proxy.errors import ApiError, InvalidRequest, NotFound
from proxy.jobs.store import FINAL, JobStore, StoreUnavailable
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse

log = logging.getLogger("fullpower.jobs")
ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
STATUSES = ("queued", "running") + FINAL


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


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


class CallbackPolicy:
    """Where callbacks may go: listed host names, and addresses inside listed CIDRs. A loopback or
    private address is reachable only through a CIDR that covers it."""

    def __init__(self, allow: list[str]) -> None:
        self.networks, self.hosts = [], set()
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower())

    async def check(self, url: str) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidRequest("callback_url must be an http(s) URL.", param="callback_url")
        host = parsed.hostname.lower()
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or 80)
        except OSError:
            raise InvalidRequest(f"callback_url host {host!r} does not resolve.", param="callback_url") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            in_cidr = any(address in net for net in self.networks)
            internal = address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
            if in_cidr or (host in self.hosts and not internal):
                continue
            raise InvalidRequest(f"callback_url {host!r} ({address}) is not allowed by jobs.callback_allow.",
                                 param="callback_url", code="callback_not_allowed")


class Jobs:
    def __init__(self, cfg: Config, api, metrics) -> None:
        self.api = api  # for authentication
        self.metrics = metrics
        self.store = JobStore(cfg.jobs_db(), cfg.jobs.max_db_bytes)
        self.counts: dict[str, int] = {}
        self.oldest_queued_s = 0.0
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}
        self._attempts: dict[str, int] = {}  # running job -> its attempt number
        self._wake = asyncio.Event()
        self.update(cfg)

    def update(self, cfg: Config) -> None:
        self.cfg = cfg
        self.policy = CallbackPolicy(cfg.jobs.callback_allow)
        self.secrets = {k.name: k.key for k in cfg.auth.keys}
        self.callback_secrets = {k.name: k.callback_secret for k in cfg.auth.keys if k.callback_secret}
        host, port = parse_host_port(cfg.listen)
        self.self_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/jobs", self.submit), web.get("/v1/jobs", self.list_jobs),
                web.get("/v1/jobs/{id}", self.get_job), web.delete("/v1/jobs/{id}", self.cancel_job)]

    def admin_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/jobs", self.admin_list), web.get("/admin/jobs/{id}", self.admin_get),
                web.post("/admin/jobs/{id}/{action:cancel|retry}", self.admin_action)]

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._open()
        self._tasks = [asyncio.create_task(self._run_loop(), name="jobs runner"),
                       asyncio.create_task(self._callback_loop(), name="jobs callbacks"),
                       asyncio.create_task(self._housekeeping(), name="jobs housekeeping")]

    async def _open(self) -> bool:
        """Open the database and recover jobs left running by a crash. An unusable database does
        not stop the appliance: job calls get 503 and opening is tried again every few seconds."""
        if self.store.is_open:
            return True
        try:
            await self.store.open()
            requeued, failed = await self.store.recover(self.cfg.jobs.max_attempts)
        except (StoreUnavailable, OSError, sqlite3.Error) as exc:
            log.error("job database %s unusable (%s); new jobs get 503 until it works", self.cfg.jobs_db(), exc)
            self.store.forget()
            return False
        if requeued or failed:
            log.warning("recovered jobs after a restart: %d back in the queue, %d failed (attempts used up)",
                        requeued, failed)
        return True

    async def stop(self) -> None:
        running, attempts = dict(self._running), dict(self._attempts)
        for task in self._tasks + list(running.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *running.values(), return_exceptions=True)
        for job_id, attempt in attempts.items():
            try:  # a shutdown is not the job's fault: back to the queue, attempt not counted
                await self.store.requeue(job_id, attempt, False, None)
            except StoreUnavailable:
                pass
        await self.store.aclose()

    # --- API ------------------------------------------------------------------------------------
    def _principal(self, request: web.Request):
        return self.api.auth.authenticate(request.headers.get("Authorization"))

    async def submit(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        body = await self.api._read_body(request)
        try:
            sub = msgspec.json.decode(body, type=JobSubmission)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"Invalid job: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
        kind = ENDPOINTS.get(sub.endpoint)
        if kind is None:
            raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        request_body = {**sub.request, "stream": False}
        request_body.pop("stream_options", None)
        parse(msgspec.json.encode(request_body), kind)  # a bad request fails now, not hours later
        if sub.callback_url:
            if principal.key_name not in self.callback_secrets:
                raise InvalidRequest("This API key has no callback_secret configured; callbacks are signed with it.",
                                     param="callback_url")
            await self.policy.check(sub.callback_url)
        idem = request.headers.get("Idempotency-Key") or None
        if idem is not None and len(idem) > 255:
            raise InvalidRequest("Idempotency-Key is longer than 255 characters.", param="Idempotency-Key")
        j = self.cfg.jobs
        try:
            job, created = await self.store.create(principal.key_name, idem, sub.endpoint, request_body,
                                                   sub.callback_url, sub.metadata, j.expire_after_s, j.callback_retry_s)
        except StoreUnavailable as exc:
            log.error("job store refused a new job: %s", exc)
            raise StoreDown("Jobs cannot be accepted right now (job storage unavailable); retry later.",
                            retry_after=30) from None
        if created:
            self._wake.set()
        # 202 only now: the row is committed (synchronous=FULL).
        return web.json_response({"id": job["id"], "object": "job", "status": job["status"],
                                  "created_at": job["created_at"]}, status=202 if created else 200)

    async def get_job(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        job = await self._read(self.store.get, request.match_info["id"], principal.key_name)
        if job is None:
            raise NotFound("No such job.", code="job_not_found")
        return web.json_response(public(job))

    async def list_jobs(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        return await self._list(request, principal.key_name)

    async def cancel_job(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        return await self._cancel(request.match_info["id"], principal.key_name)

    async def _list(self, request, key_name):
        status = request.query.get("status") or None
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}.", param="status")
        try:
            limit = max(1, min(int(request.query.get("limit", "20")), 1000))
        except ValueError:
            raise InvalidRequest("limit must be an integer.", param="limit") from None
        jobs = await self._read(self.store.list, key_name, status, limit, request.query.get("after"))
        return web.json_response({"object": "list", "data": [public(j) for j in jobs],
                                  "has_more": len(jobs) == limit, "last_id": jobs[-1]["id"] if jobs else None})

    async def _cancel(self, job_id, key_name):
        try:
            cancelled = await self.store.cancel(job_id, key_name)
        except StoreUnavailable as exc:
            raise StoreDown(f"Job storage unavailable: {exc}", retry_after=30) from None
        job = await self._read(self.store.get, job_id, key_name)
        if job is None:
            raise NotFound("No such job.", code="job_not_found")
        task = self._running.get(job_id)
        if cancelled and task is not None:
            task.cancel()
        if not cancelled and job["status"] != "cancelled":
            raise InvalidRequest(f"The job is already {job['status']}.", code="job_finished")
        return web.json_response(public(job))

    async def _read(self, fn, *args):
        try:
            return await fn(*args)
        except StoreUnavailable as exc:
            raise StoreDown(f"Job storage unavailable: {exc}", retry_after=30) from None

    async def admin_list(self, request):
        return await self._list(request, None)

    async def admin_get(self, request):
        job = await self._read(self.store.get, request.match_info["id"])
        if job is None:
            raise NotFound("No such job.", code="job_not_found")
        out = public(job)
        out["key"] = job["key_name"]
        out["callback"] = {"url": job["callback_url"], "state": job["callback_state"],
                           "attempts": await self.store.callback_attempts(job["id"])}
        return web.json_response(out)

    async def admin_action(self, request):
        job_id, action = request.match_info["id"], request.match_info["action"]
        if action == "cancel":
            return await self._cancel(job_id, None)
        if not await self.store.retry(job_id):
            raise InvalidRequest("Only failed, cancelled or expired jobs can be retried.")
        self._wake.set()
        return web.json_response(public(await self.store.get(job_id)))

    # --- the runner -----------------------------------------------------------------------------
    async def _run_loop(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            while True:
                room = self.cfg.jobs.concurrency - len(self._running)
                claimed = []
                if room > 0:
                    try:
                        claimed = await self.store.claim(room)
                    except StoreUnavailable as exc:
                        log.error("job store unavailable: %s", exc)
                for job in claimed:
                    task = asyncio.create_task(self._execute(session, job))
                    self._running[job["id"]] = task
                    self._attempts[job["id"]] = job["attempts"]
                    task.add_done_callback(self._done)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05 if claimed else 0.5)
                except asyncio.TimeoutError:
                    pass

    def _done(self, task: asyncio.Task) -> None:
        for job_id, t in list(self._running.items()):
            if t is task:
                del self._running[job_id]
                self._attempts.pop(job_id, None)

    async def _execute(self, session: aiohttp.ClientSession, job: dict) -> None:
        """One attempt: the job's request through our own API, at the jobs tier (X-Priority can only
        lower a tier), so admission, cache and coalescing apply as to any request."""
        headers = {"X-Priority": self.cfg.jobs_tier(), "X-Request-Id": f"{job['id']}.{job['attempts']}"}
        if job["key_name"] != ANONYMOUS:
            secret = self.secrets.get(job["key_name"])
            if secret is None:
                await self._finish(job, "failed", None, "the job's API key is no longer configured")
                return
            headers["Authorization"] = f"Bearer {secret}"
        delay = 0.2
        while True:
            try:
                async with session.post(self.self_url + job["endpoint"], json=job["request"], headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=None)) as resp:
                    payload = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError) as exc:
                status, payload = 0, str(exc).encode()
            if status in (429, 503):
                # Overloaded: the interactive tiers come first. Wait and try again; not an attempt.
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)
                continue
            break
        if status == 200:
            await self._finish(job, "succeeded", json.loads(payload), None)
        elif 400 <= status < 500:
            await self._finish(job, "failed", None, _error_message(payload, status))
        elif job["attempts"] < self.cfg.jobs.max_attempts:
            await self.store.requeue(job["id"], job["attempts"], True, _error_message(payload, status))
            self._wake.set()
        else:
            await self._finish(job, "failed", None, _error_message(payload, status))

    async def _finish(self, job, status, result, error) -> None:
        try:
            stored = await self.store.finish(job["id"], job["attempts"], status, result, error,
                                             self.cfg.jobs.callback_retry_s)
        except StoreUnavailable as exc:
            log.error("could not store the outcome of job %s (it will run again): %s", job["id"], exc)
            return
        if stored:
            self.metrics.jobs_finished.labels(status).inc()

    # --- callbacks ------------------------------------------------------------------------------
    async def _callback_loop(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    due = await self.store.callbacks_due(32)
                except StoreUnavailable:
                    due = []
                if due:
                    await asyncio.gather(*(self._deliver(session, job) for job in due))
                else:
                    await asyncio.sleep(0.2)

    async def _deliver(self, session: aiohttp.ClientSession, job: dict) -> None:
        body = msgspec.json.encode(public(job))
        ts = int(time.time())
        secret = self.callback_secrets.get(job["key_name"], "")
        headers = {"Content-Type": "application/json", "X-Fullpower-Job": job["id"],
                   "X-Fullpower-Signature": f"t={ts},v1={sign(secret, ts, body)}"}
        status, error, refused = None, None, False
        try:
            await self.policy.check(job["callback_url"])  # the allowlist may have changed since submission
            async with session.post(job["callback_url"], data=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self.cfg.jobs.callback_timeout_s)) as resp:
                status = resp.status
                await resp.read()
        except InvalidRequest as exc:  # the allowlist no longer admits the target: final
            error, refused = exc.message, True
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        delivered = status is not None and 200 <= status < 300
        # Retry network errors, timeouts and 5xx; a 4xx or a target the allowlist refuses is final.
        retry = not delivered and not refused and not (status is not None and 400 <= status < 500)
        next_at = None
        if retry:
            backoff = min(300.0, 2.0 ** min(job["callback_attempts"], 10))
            next_at = time.time() + backoff * random.uniform(0.5, 1.5)
        state = await self.store.callback_result(job["id"], status, error, delivered, next_at)
        self.metrics.job_callbacks.labels("delivered" if delivered else ("retry" if state == "pending" else "failed")).inc()

    # --- housekeeping ---------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        while True:
            if not await self._open():
                await asyncio.sleep(5.0)
                continue
            try:
                expired = await self.store.expire()
                if expired:
                    log.warning("%d queued jobs expired before they could run", expired)
                    self.metrics.jobs_finished.labels("expired").inc(expired)
                await self.store.prune(self.cfg.jobs.retention_s)
                self.counts = await self.store.counts()
                oldest = await self.store.list(None, "queued", 1, None)
                self.oldest_queued_s = time.time() - oldest[0]["created_at"] if oldest else 0.0
            except StoreUnavailable as exc:
                log.error("job housekeeping: %s", exc)
            await asyncio.sleep(1.0)


def _error_message(payload: bytes, status: int) -> str:
    try:
        return json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {payload[:200].decode(errors='replace')}" if status else payload.decode(errors="replace")
