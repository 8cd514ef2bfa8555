"""The workload a load test offers: from a small YAML file and/or flags (msgspec-validated)."""

from __future__ import annotations

import ipaddress
import random
import urllib.parse
from typing import Annotated, Union

import msgspec
import yaml

Share = Annotated[float, msgspec.Meta(ge=0, le=1)]


class TierMix(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    key: str
    share: Annotated[float, msgspec.Meta(gt=0)] = 1.0


class Workload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "http://127.0.0.1:8080"
    admin_url: str = "http://127.0.0.1:9091"
    admin_token: str = ""  # the admin listener's token (chaos kills go through the admin API)
    model: str = "fake-model"
    mode: str = "open"  # open: Poisson arrivals at `rate`; closed: `concurrency` clients back to back
    rate: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 16
    duration_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 1_000_000
    tiers: dict[str, TierMix] = {}
    prompt_words: tuple[int, int] = (8, 32)
    max_tokens: tuple[int, int] = (8, 32)
    # a fixed output length (served runs generate what engine-alone runs do): vLLM's parameters
    ignore_eos: bool = False
    min_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # capped at each request's max_tokens
    stream_share: Share = 0.5
    duplicate_share: Share = 0.0
    chaos_every_s: Union[Annotated[float, msgspec.Meta(gt=0)], None] = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    seed: int = 1

    def check(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError("mode: expected 'open' or 'closed'")
        for field in ("url", "admin_url"):
            host = urllib.parse.urlparse(getattr(self, field)).hostname or ""
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(f"{field}: load tests only target loopback addresses, not {host!r}")
        for field in ("prompt_words", "max_tokens"):
            lo, hi = getattr(self, field)
            if not 1 <= lo <= hi:
                raise ValueError(f"{field}: expected [low, high] with 1 <= low <= high")


def load_workload(path: str | None, overrides: dict) -> Workload:
    raw = yaml.safe_load(open(path)) if path else {}
    raw = {**(raw or {}), **{k: v for k, v in overrides.items() if v is not None}}
    workload = msgspec.convert(raw, Workload)
    if not workload.tiers:
        workload = msgspec.structs.replace(workload, tiers={"default": TierMix(key="sk-anything")})
    workload.check()
    return workload


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


class RequestFactory:
    """Draws each request of the workload: tier, prompt, length, streaming, duplicates."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.rng = random.Random(w.seed)
        self.tiers = list(w.tiers)
        self.weights = [w.tiers[t].share for t in self.tiers]
        self.recent: list[dict] = []
        self.n = 0

    def next(self) -> tuple[str, str, dict]:
        """(tier, key, body)"""
        w, rng = self.w, self.rng
        tier = rng.choices(self.tiers, self.weights)[0]
        self.n += 1
        if self.recent and rng.random() < w.duplicate_share:
            body = dict(rng.choice(self.recent))
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*w.prompt_words)))
            body = {"model": w.model, "messages": [{"role": "user", "content": f"{self.n} {words}"}],
                    "max_tokens": rng.randint(*w.max_tokens), "temperature": 0}
            if w.ignore_eos:
                body["ignore_eos"] = True
            if w.min_tokens:
                body["min_tokens"] = min(w.min_tokens, body["max_tokens"])
            self.recent = (self.recent + [body])[-100:]
        body["stream"] = rng.random() < w.stream_share
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        return tier, w.tiers[tier].key, body
