"""API keys -> (key name, tier). Secrets are compared in constant time and never logged or echoed."""

from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple

from proxy.config import Auth
from proxy.errors import Unauthorized


class Principal(NamedTuple):
    key_name: str
    tier: str
    pools: tuple[str, ...] = ()  # pools beyond the tier's own whose models this caller may call


ANONYMOUS = "anonymous"


class Authenticator:
    """Owns the `auth` section: who a bearer secret is, and (for jobs, which run later) who a key
    name is."""

    def __init__(self, auth: Auth) -> None:
        self.reconfigure(auth)

    def reconfigure(self, auth: Auth) -> None:
        # Compare digests, so every comparison has the same length and takes the same time.
        self._by_name = {k.name: Principal(k.name, k.tier, tuple(k.pools)) for k in auth.keys}
        self._keys = [(hashlib.sha256(k.key.encode()).digest(), self._by_name[k.name]) for k in auth.keys]
        self._anonymous = Principal(ANONYMOUS, auth.anonymous_tier) if auth.allow_anonymous else None

    def authenticate(self, authorization: str | None) -> Principal:
        secret = ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                secret = value.strip()
        if secret:
            digest = hashlib.sha256(secret.encode()).digest()
            found = None
            for key_digest, principal in self._keys:
                if hmac.compare_digest(digest, key_digest):
                    found = principal
            if found is not None:
                return found
        if self._anonymous is not None:
            return self._anonymous
        if not secret:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        raise Unauthorized("Incorrect API key provided.")

    def principal_for(self, key_name: str) -> Principal | None:
        """The principal a key name stands for now (None when the key, or anonymous access, is gone)."""
        if key_name == ANONYMOUS:
            return self._anonymous
        return self._by_name.get(key_name)
