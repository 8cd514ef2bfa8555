"""Who may use the admin listener: a bearer token (a file the operator and the CLI read), no
cross-site requests, and a loud warning when it listens beyond loopback. Probes and /metrics stay
open: they change nothing and show no tenant's data."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path

from aiohttp import web

from proxy.errors import Forbidden, Unauthorized

log = logging.getLogger("fullpower")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})


def load_or_create_token(path: Path) -> str:
    """The token in `path`; a new random one (written owner-only) when the file does not exist."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("created the admin token in %s (owner-only)", path)
    if len(token) < 16:
        raise ValueError(f"the admin token in {path} is shorter than 16 characters")
    return token


def exposure_warning(address: str) -> str | None:
    """A warning when the admin listener binds beyond loopback (0.0.0.0 included), else None."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"admin_listen {address} is not a loopback address: the admin API (token-protected) is "
            "reachable from the network; bind it to 127.0.0.1 unless you mean it")


def warn_if_exposed(address: str) -> None:
    warning = exposure_warning(address)
    if warning:
        log.warning("!!! %s", warning)


class AdminGuard:
    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        # A browser page must not drive the admin API: refuse anything a browser marks cross-site.
        site = request.headers.get("Sec-Fetch-Site", "none")
        if request.headers.get("Origin") is not None or site not in ("none", "same-origin"):
            raise Forbidden("Cross-site requests to the admin API are refused.")
        if request.path not in OPEN_PATHS:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            given = hashlib.sha256(value.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._digest):
                raise Unauthorized("The admin API needs 'Authorization: Bearer <admin token>' "
                                   "(the content of admin_token_file).")
        return await handler(request)
