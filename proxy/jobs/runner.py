"""Runs queued jobs in-process through the serving core, like any request but at the jobs tier:
planned by the same Planner, admitted by the same gate, answered from the same cache. No HTTP to
the appliance itself and no stored API secret: a job carries its key's name, and the key's tier
and limits are looked up when it runs."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

import msgspec

from proxy.errors import ApiError, NoWorkerReady, Overloaded
from proxy.jobs.store import JobStore, StoreUnavailable
from proxy.metrics import Metrics
from proxy.serving.auth import Authenticator
from proxy.serving.core import ServingCore
from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
from proxy.serving.plan import Planner
from proxy.serving.record import RequestRecord
from proxy.serving.responses import ResponseFormatter

log = logging.getLogger("fullpower.jobs")
ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
IDLE_POLL_S = (0.5, 2.0)  # without a wake-up the queue is looked at again after this long: at first, at most
STORE_RETRY_DELAYS_S = (0.2, 1.0, 3.0)  # storing a job's outcome is tried this often, these pauses after each


class JobRunner:
    def __init__(self, store: JobStore, auth: Authenticator, planner: Planner, core: ServingCore,
                 metrics: Metrics) -> None:
        self.store = store
        self.auth = auth
        self.planner = planner
        self.core = core
        self.metrics = metrics
        self.running: dict[str, asyncio.Task] = {}  # job id -> its attempt's task
        self._attempts: dict[str, int] = {}  # running job id -> its attempt number
        self.wake = asyncio.Event()  # set when a job was queued
        self._abandoned_calls: set[asyncio.Task] = set()  # renewals given up on, still cancelling
        self.tier = ""
        self.concurrency = 16
        self.max_attempts = 3
        self.callback_retry_s = 3600.0
        self.on_finished: Callable[[], None] = lambda: None  # a job's outcome was stored (its callback is due)

    def reconfigure(self, tier: str, concurrency: int, max_attempts: int, callback_retry_s: float) -> None:
        self.tier, self.concurrency = tier, concurrency
        self.max_attempts, self.callback_retry_s = max_attempts, callback_retry_s

    def cancel(self, job_id: str) -> None:
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()

    async def keep_leases(self, lease_s: float) -> None:
        """A shared store leases each running job to this host: renew the leases every quarter of
        their length. A job whose lease is lost (another host took it over, or it was cancelled)
        stops here at once. A renewal that fails or hangs (the database unreachable, this host cut
        off) is given up after an eighth of the lease; and when the next renewal could not be
        known to succeed before the leases run out (counted from when the last successful renewal
        was sent: never later than the database's own count), every attempt stops, so that no job
        runs here after another host may have taken it over."""
        interval, call_timeout = lease_s / 4, lease_s / 8
        renewed_at = time.monotonic()  # when the last successful renewal was sent
        while True:
            await asyncio.sleep(interval)
            sent_at = time.monotonic()
            try:
                lost = await self._renew_within(call_timeout)
                renewed_at = sent_at
            except (StoreUnavailable, asyncio.TimeoutError) as exc:
                reason = str(exc) or "no answer"
                # the next decision point is one interval and one call away
                if time.monotonic() + interval + call_timeout < renewed_at + lease_s or not self.running:
                    log.warning("could not renew job leases (%s); trying again", reason)
                    continue
                lost = list(self._attempts.items())
                log.error("job leases not renewed for %.1fs (%s): stopping %d running jobs before their leases "
                          "run out; other hosts take them over", time.monotonic() - renewed_at, reason, len(lost))
            for job_id, attempt in lost:
                # Only the attempt the renewal was about: one that finished meanwhile has nothing to
                # stop, and a later attempt of the same job (claimed here again) holds its own lease.
                if self._attempts.get(job_id) != attempt:
                    continue
                log.warning("job %s: lease lost, stopping its attempt here", job_id)
                self._abandon(job_id)

    async def _renew_within(self, timeout: float) -> list[tuple[str, int]]:
        """One renewal, given up after `timeout`; returns the (job id, attempt) pairs it found lost.
        Not asyncio.wait_for: it would wait for the cancelled call to finish cancelling, and on a
        dead network the driver's cancellation hangs too; the call is left to end in the background
        instead."""
        attempts = dict(self._attempts)
        task = asyncio.ensure_future(self.store.renew(attempts))
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            self._abandoned_calls.add(task)
            task.add_done_callback(self._abandoned_calls.discard)
            raise asyncio.TimeoutError
        return [(job_id, attempts[job_id]) for job_id in task.result()]

    def _abandon(self, job_id: str) -> None:
        """Stop an attempt without touching the job's row: it belongs to another host now."""
        self._attempts.pop(job_id, None)
        self.cancel(job_id)

    async def run(self) -> None:
        store_down = False
        idle_s = IDLE_POLL_S[0]
        while True:
            self.wake.clear()  # before looking: a job queued while we look is looked for again
            room = self.concurrency - len(self.running)
            claimed = []
            if room > 0:
                try:
                    claimed = await self.store.claim(room)
                    if store_down:
                        store_down = False
                        log.warning("job store available again: running queued jobs")
                except StoreUnavailable as exc:
                    if not store_down:  # once per outage, not twice a second
                        store_down = True
                        log.error("job store unavailable (%s): no jobs start until it is back", exc)
            for job in claimed:
                task = asyncio.create_task(self._execute_guarded(job), name=f"job {job['id']}")
                self.running[job["id"]] = task
                self._attempts[job["id"]] = job["attempts"]
                task.add_done_callback(lambda _, job_id=job["id"]: self._done(job_id))
            # Jobs queued here, requeued, or announced by other hosts (LISTEN) set `wake`; the
            # looks in between are a safety net, less and less often while none is found.
            wait_s = 0.05 if claimed else idle_s
            idle_s = IDLE_POLL_S[0] if claimed else min(idle_s * 2, IDLE_POLL_S[1])
            try:
                await asyncio.wait_for(self.wake.wait(), wait_s)
            except asyncio.TimeoutError:
                pass

    def _done(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self._attempts.pop(job_id, None)
        self.wake.set()  # room for another

    async def stop(self) -> None:
        """Cancel running attempts; their jobs go back to the queue, the attempt not counted (a
        shutdown is not the job's fault)."""
        running, attempts = dict(self.running), dict(self._attempts)  # abandoned attempts are not requeued
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        for job_id, attempt in attempts.items():
            try:
                await self.store.requeue(job_id, attempt, False, None)
            except StoreUnavailable:
                pass

    async def _execute_guarded(self, job: dict) -> None:
        try:
            await self._execute(job)
        except Exception:  # noqa: BLE001 - a bug must not leave the job running for good
            log.exception("job %s attempt %d failed unexpectedly; back to the queue", job["id"], job["attempts"])
            try:
                await self.store.requeue(job["id"], job["attempts"], True, "internal error")
            except StoreUnavailable as exc:
                log.error("could not requeue job %s: %s", job["id"], exc)

    async def _execute(self, job: dict) -> None:
        """One attempt. Overload (429/503) is not the job's fault: wait and try again, uncounted."""
        principal = self.auth.principal_for(job["key_name"])
        if principal is None:
            await self._finish(job, "failed", None, "the job's API key is no longer configured")
            return
        delay = 0.2
        while True:
            rec = RequestRecord(f"{job['id']}.{job['attempts']}", "job", "POST", job["endpoint"])
            rec.key = principal.key_name
            try:
                result = await self._answer(job, principal, rec)
                error = None
            except (Overloaded, NoWorkerReady) as exc:
                rec.fail(exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)
                continue
            except ApiError as exc:
                rec.fail(exc)
                result, error = None, exc
            finally:
                rec.finish(self.metrics)
            break
        if error is None:
            await self._finish(job, "succeeded", result, None)
        elif error.status < 500 or job["attempts"] >= self.max_attempts:
            await self._finish(job, "failed", None, error.message)
        else:
            try:
                await self.store.requeue(job["id"], job["attempts"], True, error.message)
            except StoreUnavailable as exc:
                log.error("could not requeue job %s: %s", job["id"], exc)
            self.wake.set()

    async def _answer(self, job: dict, principal, rec: RequestRecord) -> dict:
        req = parse(msgspec.json.encode(job["request"]), ENDPOINTS[job["endpoint"]])
        rec.model = req.model
        plans = self.planner.plan_choices(principal, self.tier, req, choose_pool=self.core.choose_pool,
                                          context_of=self.core.context_length)
        plan = plans[0]
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        outcomes = []
        for choice in plans:  # one after another: a job is not in a hurry
            async with self.core.answer(choice, rec) as answer:
                outcomes.append(await answer.collect())
        return ResponseFormatter(plan.chat, plan.model, plan.shape, plan.params.logprobs).complete_choices(outcomes)

    async def _finish(self, job: dict, status: str, result, error) -> None:
        """Store the outcome. A store that refuses it (disk full, say) is tried again a few times;
        then the job fails with the reason (a small write), and if even that cannot be written it
        goes back to the queue. A job is never left `running` by a store error."""
        problem = None
        for delay in STORE_RETRY_DELAYS_S:
            try:
                stored = await self.store.finish(job["id"], job["attempts"], status, result, error,
                                                 self.callback_retry_s)
            except StoreUnavailable as exc:
                problem = exc
                log.error("could not store the outcome of job %s (trying again in %.1fs): %s", job["id"], delay, exc)
                await asyncio.sleep(delay)
                continue
            if stored:
                self.metrics.jobs_finished.labels(status).inc()
                self.on_finished()
            return
        reason = f"the result could not be stored: {problem}"
        try:
            if await self.store.fail_unstored(job["id"], job["attempts"], reason):
                self.metrics.jobs_finished.labels("failed").inc()
            return
        except StoreUnavailable as exc:
            log.error("could not fail job %s either (%s); back to the queue", job["id"], exc)
        try:
            await self.store.requeue(job["id"], job["attempts"], False, reason)
        except StoreUnavailable as exc:
            log.error("job %s stays running until the next start recovers it: %s", job["id"], exc)
