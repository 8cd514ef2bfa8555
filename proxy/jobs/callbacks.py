"""Signed job callbacks: where they may go (the allowlist) and the loop that delivers them, with
retries and backoff, from the store's queue of due callbacks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
import urllib.parse

import aiohttp
import msgspec
import yarl

from proxy.errors import InvalidRequest
from proxy.jobs.store import JobStore, StoreUnavailable
from proxy.metrics import Metrics

log = logging.getLogger("fullpower.jobs")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


class CallbackRefused(Exception):
    """The allowlist refuses the target (final, unlike a DNS or network failure)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


NAT64 = ipaddress.ip_network("64:ff9b::/96")
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable, also through an IPv6 form that wraps an internal IPv4 address. Python's
    is_global already excludes CGNAT (100.64.0.0/10), link-local (cloud metadata) and the rest."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return inner.is_global
        if address in LOCAL_NAT64:
            return False
    return address.is_global


class CallbackPolicy:
    """Where callbacks may go: listed host names with public addresses, and addresses inside listed
    CIDRs (the only way to reach an internal address). Never the appliance's own listeners."""

    def __init__(self, allow: list[str], own_listeners: list[tuple[str, int]] = ()) -> None:
        self.networks, self.hosts = [], set()
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower())
        self.own = [(_ip_or_none(host), port) for host, port in own_listeners]

    def _is_own(self, address, port: int) -> bool:
        for host, own_port in self.own:
            if port == own_port and (host is None or host.is_unspecified or host == address
                                     or address.is_loopback or address.is_unspecified):
                return True
        return False

    def allowed(self, host: str, address, port: int) -> str | None:
        """None when the target may be called, else why not."""
        if self._is_own(address, port):
            return "it is one of this appliance's own listeners"
        if any(address in net for net in self.networks):
            return None
        if host in self.hosts and is_public(address):
            return None
        return "not allowed by jobs.callback_allow"

    async def resolve(self, url: str) -> tuple[str, int, list[str]]:
        """(host, port, the addresses to connect to, every one checked). Raises InvalidRequest for a
        bad URL, CallbackRefused when the policy says no, OSError when the name does not resolve."""
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidRequest("callback_url must be an http(s) URL.", param="callback_url")
        host = parsed.hostname.lower()
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            why = self.allowed(host, address, port)
            if why is not None:
                raise CallbackRefused(f"callback_url {host!r} ({address}) is refused: {why}.")
            addresses.append(str(address))
        return host, port, list(dict.fromkeys(addresses))

    async def check(self, url: str) -> None:
        """At submission: refuse a target that is not allowed now (400)."""
        try:
            await self.resolve(url)
        except CallbackRefused as exc:
            raise InvalidRequest(str(exc), param="callback_url", code="callback_not_allowed") from None
        except OSError:
            raise InvalidRequest("callback_url's host does not resolve.", param="callback_url") from None


def _ip_or_none(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class CallbackSender:
    """Delivers due callbacks, up to MAX_IN_FLIGHT at once, each on its own (a slow target delays
    only its own delivery); owned and run by the JobService."""

    MAX_IN_FLIGHT = 32
    MAX_RESPONSE_BYTES = 64 * 1024  # of a target's answer body: read to free the connection, no more
    BUSY_POLL_S = 0.2  # how often due callbacks are looked for while deliveries are under way
    IDLE_POLL_S = 1.6  # ... and at least this often when none were due

    def __init__(self, store: JobStore, metrics: Metrics, public) -> None:
        self.store = store
        self.metrics = metrics
        self.public = public  # job row -> the job as clients see it
        self.policy = CallbackPolicy([])
        self.secrets: dict[str, str] = {}
        self.timeout_s = 10.0
        self._in_flight: dict[str, asyncio.Task] = {}  # job id -> its delivery
        self.wake = asyncio.Event()  # set when a job finished here (its callback is due now)

    def reconfigure(self, allow: list[str], own_listeners: list[tuple[str, int]], secrets: dict[str, str],
                    timeout_s: float) -> None:
        self.policy = CallbackPolicy(allow, own_listeners)
        self.secrets = secrets  # key name -> callback secret
        self.timeout_s = timeout_s

    async def run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.MAX_IN_FLIGHT,
                                                                        use_dns_cache=False)) as session:
            try:
                idle_s = self.BUSY_POLL_S
                while True:
                    self.wake.clear()  # before looking: a job finished while we look is looked for again
                    room = self.MAX_IN_FLIGHT - len(self._in_flight)
                    due = []
                    if room > 0:
                        try:
                            due = [job for job in await self.store.callbacks_due(self.MAX_IN_FLIGHT)
                                   if job["id"] not in self._in_flight][:room]
                        except StoreUnavailable:
                            pass
                    for job in due:
                        task = asyncio.create_task(self._deliver_guarded(session, job))
                        self._in_flight[job["id"]] = task
                        task.add_done_callback(lambda _, job_id=job["id"]: self._in_flight.pop(job_id, None))
                    # The queue of due callbacks lives in the database (other hosts finish jobs, failed
                    # deliveries come due again later): look again soon while there is traffic, less
                    # and less often while there is none; a job finished here wakes the loop at once.
                    if due or self._in_flight:
                        idle_s = self.BUSY_POLL_S
                        await asyncio.sleep(self.BUSY_POLL_S)
                        continue
                    idle_s = min(idle_s * 2, self.IDLE_POLL_S)
                    try:
                        await asyncio.wait_for(self.wake.wait(), idle_s)
                    except asyncio.TimeoutError:
                        pass
            finally:
                tasks = list(self._in_flight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

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
            async with asyncio.timeout(self.timeout_s):
                # Resolve once, check every address, and connect to a checked address itself:
                # a second resolution by the HTTP client could answer differently (DNS rebinding).
                host, port, addresses = await self.policy.resolve(job["callback_url"])
                url = yarl.URL(job["callback_url"])
                pinned = url.with_host(addresses[0])
                headers["Host"] = url.host_port_subcomponent
                async with session.post(pinned, data=body, headers=headers, allow_redirects=False,
                                        server_hostname=host if url.scheme == "https" else None) as resp:
                    status = resp.status
                    await resp.content.read(self.MAX_RESPONSE_BYTES)
        except CallbackRefused as exc:  # the allowlist no longer admits the target: final
            error, refused = str(exc), True
        except InvalidRequest as exc:
            error, refused = exc.message, True
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # DNS failures included: retried
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        delivered = status is not None and 200 <= status < 300
        # Retry network and DNS errors, timeouts and 5xx; a 4xx or a refused target is final.
        retry = not delivered and not refused and not (status is not None and 400 <= status < 500)
        next_at = None
        if retry:
            backoff = min(300.0, 2.0 ** min(job["callback_attempts"], 10))
            next_at = time.time() + backoff * random.uniform(0.5, 1.5)
        state = await self.store.callback_result(job["id"], status, error, delivered, next_at)
        outcome = "delivered" if delivered else ("retry" if state == "pending" else "failed")
        self.metrics.job_callbacks.labels(outcome).inc()
