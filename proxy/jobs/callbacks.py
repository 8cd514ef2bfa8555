"""Signed job callbacks: where they may go (the allowlist) and the loop that delivers them, with
retries and backoff, from the store's queue of due callbacks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import time
import urllib.parse

import aiohttp
import msgspec

from proxy.errors import InvalidRequest
from proxy.jobs.store import JobStore, StoreUnavailable
from proxy.metrics import Metrics

log = logging.getLogger("fullpower.jobs")


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


class CallbackSender:
    """Delivers due callbacks, 32 at a time; owned and run by the JobService."""

    def __init__(self, store: JobStore, metrics: Metrics, public) -> None:
        self.store = store
        self.metrics = metrics
        self.public = public  # job row -> the job as clients see it
        self.policy = CallbackPolicy([])
        self.secrets: dict[str, str] = {}
        self.timeout_s = 10.0

    def reconfigure(self, allow: list[str], secrets: dict[str, str], timeout_s: float) -> None:
        self.policy = CallbackPolicy(allow)
        self.secrets = secrets  # key name -> callback secret
        self.timeout_s = timeout_s

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    due = await self.store.callbacks_due(32)
                except StoreUnavailable:
                    due = []
                if due:
                    await asyncio.gather(*(self._deliver_guarded(session, job) for job in due))
                else:
                    await asyncio.sleep(0.2)  # the queue of due callbacks lives in the database

    async def _deliver_guarded(self, session: aiohttp.ClientSession, job: dict) -> None:
        """No store error (or bug) in one delivery may end the loop for the life of the process."""
        try:
            await self._deliver(session, job)
        except StoreUnavailable as exc:
            log.error("could not record the callback of job %s (it stays due): %s", job["id"], exc)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.exception("callback delivery of job %s failed", job["id"])

    async def _deliver(self, session: aiohttp.ClientSession, job: dict) -> None:
        body = msgspec.json.encode(self.public(job))
        ts = int(time.time())
        secret = self.secrets.get(job["key_name"], "")
        headers = {"Content-Type": "application/json", "X-Fullpower-Job": job["id"],
                   "X-Fullpower-Signature": f"t={ts},v1={sign(secret, ts, body)}"}
        status, error, refused = None, None, False
        try:
            await self.policy.check(job["callback_url"])  # the allowlist may have changed since submission
            async with session.post(job["callback_url"], data=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
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
        outcome = "delivered" if delivered else ("retry" if state == "pending" else "failed")
        self.metrics.job_callbacks.labels(outcome).inc()
