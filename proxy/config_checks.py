"""The configuration's checks: type and range problems field by field (so one bad field does not
hide the others), and the cross-field rules (names that must exist, devices used once, ...). Each
problem names its field path."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from pathlib import Path

import msgspec

from proxy.config import Config, parse_host_port


def module_available(name: str) -> bool:
    """Whether `name` can be imported here, without importing it (the proxy never loads torch)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _path_of(exc: msgspec.ValidationError, prefix: str) -> str:
    msg = str(exc)
    reason, sep, where = msg.rpartition(" - at `$")
    if not sep:
        return f"{prefix or '(top level)'}: {msg}"
    path = (prefix + where.rstrip("`")).lstrip(".")
    return f"{path or '(top level)'}: {reason}"


def type_problems(raw: dict) -> list[str]:
    """Collect type/range errors field by field, so one bad field does not hide the others."""
    problems = []
    fields = {f.name: f for f in msgspec.structs.fields(Config)}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            problems.append(f"{key}: unknown field")
            continue
        items = list(enumerate(value)) if isinstance(value, list) else None
        if items is not None and hasattr(field.type, "__args__"):
            (elem_type,) = field.type.__args__
            for i, item in items:
                try:
                    msgspec.convert(item, elem_type)
                except msgspec.ValidationError as exc:
                    problems.append(_path_of(exc, f"{key}[{i}]"))
            continue
        try:
            msgspec.convert(value, field.type)
        except msgspec.ValidationError as exc:
            problems.append(_path_of(exc, key))
    for f in fields.values():
        if f.required and f.name not in raw:
            problems.append(f"{f.name}: required field is missing")
    return problems


def cross_field_problems(cfg: Config) -> list[str]:
    problems = []

    def dupes(items, what):
        seen = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append(f"{what}[{i}].name: duplicate name {item.name!r}")
            seen.add(item.name)

    dupes(cfg.pools, "pools")
    dupes(cfg.tiers, "tiers")
    dupes(cfg.auth.keys, "auth.keys")
    for field in ("listen", "admin_listen"):
        if field == "listen" and cfg.listen == "":
            continue  # no public listener: a host that only runs jobs (and answers its admin listener)
        try:
            parse_host_port(getattr(cfg, field))
        except ValueError as exc:
            problems.append(f"{field}: {exc}")
    if cfg.listen == cfg.admin_listen:
        problems.append("admin_listen: must differ from listen")
    if not cfg.pools:
        problems.append("pools: at least one pool is required")
    if not cfg.tiers:
        problems.append("tiers: at least one tier is required")
    pool_names = {p.name for p in cfg.pools}
    tier_names = {t.name for t in cfg.tiers}
    gpu_owner: dict[str, str] = {}
    for i, pool in enumerate(cfg.pools):
        where = f"pools[{i}]"
        wanted = pool.replicas.hot + pool.replicas.cold
        if wanted > len(pool.devices):
            problems.append(f"{where}.replicas: {wanted} replicas (hot + cold) but only "
                            f"{len(pool.devices)} devices listed")
        for j, dev in enumerate(pool.devices):
            if dev == "cpu":
                continue
            kind, _, index = dev.partition(":")
            if kind != "cuda" or not index.isdigit():
                problems.append(f"{where}.devices[{j}]: expected 'cpu' or 'cuda:N', got {dev!r}")
            elif dev in gpu_owner:
                problems.append(f"{where}.devices[{j}]: {dev} is already used by pool {gpu_owner[dev]!r}")
            else:
                gpu_owner[dev] = pool.name
        if pool.dtype == "int8" and pool.engine == "transformers" and not module_available("torchao"):
            problems.append(f"{where}.dtype: int8 needs the torchao package on this host "
                            "(pip install torchao), or choose float32, bfloat16 or float16")
        if pool.engine == "transformers" and pool.model_path:
            path = Path(pool.model_path)
            if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
                problems.append(f"{where}.model_path: {pool.model_path!r} is not a readable directory")
            elif not (path / "config.json").is_file():
                problems.append(f"{where}.model_path: {pool.model_path!r} has no config.json "
                                "(not a Hugging Face model directory)")
    for i, tier in enumerate(cfg.tiers):
        if tier.pool not in pool_names:
            problems.append(f"tiers[{i}].pool: no pool named {tier.pool!r}")
        fb = tier.fallback
        if fb is not None:
            if fb.pool not in pool_names:
                problems.append(f"tiers[{i}].fallback.pool: no pool named {fb.pool!r}")
            elif fb.pool == tier.pool:
                problems.append(f"tiers[{i}].fallback.pool: a fallback loop ({tier.pool!r} falls back to itself)")
            if fb.queue_depth is None and fb.utilization is None and fb.expected_wait_s is None:
                problems.append(f"tiers[{i}].fallback: set at least one of queue_depth, utilization, expected_wait_s")
    for i, key in enumerate(cfg.auth.keys):
        if key.tier not in tier_names:
            problems.append(f"auth.keys[{i}].tier: no tier named {key.tier!r}")
        if key.name == "anonymous":
            problems.append(f"auth.keys[{i}].name: 'anonymous' is reserved for callers without a key")
        for j, pool in enumerate(key.pools):
            if pool not in pool_names:
                problems.append(f"auth.keys[{i}].pools[{j}]: no pool named {pool!r}")
    secrets = [k.key for k in cfg.auth.keys]
    if len(set(secrets)) != len(secrets):
        problems.append("auth.keys: the same key appears twice")
    if cfg.auth.allow_anonymous and cfg.auth.anonymous_tier not in tier_names:
        problems.append(f"auth.anonymous_tier: no tier named {cfg.auth.anonymous_tier!r}")
    if not cfg.auth.allow_anonymous and not cfg.auth.keys:
        problems.append("auth: no keys and allow_anonymous is false: nobody could call the API")
    for i, net in enumerate(cfg.limits.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"limits.trusted_proxies[{i}]: not an IP address or CIDR: {net!r}")
    if cfg.jobs.tier and cfg.jobs.tier not in tier_names:
        problems.append(f"jobs.tier: no tier named {cfg.jobs.tier!r}")
    for i, entry in enumerate(cfg.jobs.callback_allow):
        if not entry or " " in entry:
            problems.append(f"jobs.callback_allow[{i}]: expected a host name or a CIDR, got {entry!r}")
    j = cfg.jobs
    if j.store == "postgresql" and not j.dsn.startswith(("postgresql://", "postgres://")):
        problems.append("jobs.dsn: store postgresql needs a DSN of the form postgresql://user@host:port/database")
    if j.store == "sqlite" and j.dsn:
        problems.append("jobs.dsn: only used with store: postgresql (this config stores jobs in SQLite)")
    if j.store == "postgresql" and j.db_path:
        problems.append("jobs.db_path: only used with store: sqlite (this config stores jobs in PostgreSQL)")
    sh = cfg.shared
    if sh.redis_url and not sh.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"shared.redis_url: expected redis://host:port/db, rediss:// or unix://, got {sh.redis_url!r}")
    if sh.advertise:
        try:
            parse_host_port(sh.advertise)
        except ValueError as exc:
            problems.append(f"shared.advertise: {exc}")
    w = cfg.workers
    if w.restart_backoff_initial_s > w.restart_backoff_max_s:
        problems.append("workers.restart_backoff_max_s: must be >= restart_backoff_initial_s")
    return problems
