"""Configuration: the schema (msgspec Structs, unknown fields forbidden) and the loader. The
checks that name each problem by its field path live in config_checks.py. Every problem is
reported as `field.path: reason`; never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

import msgspec
import yaml

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]

EMBEDDED_MODEL_DIRNAME = "smollm2-135m-instruct"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9091"


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Replicas(_Base, kw_only=True):
    hot: PosInt = 1
    cold: NonNegInt = 0


class FakeEngineSettings(_Base, kw_only=True):
    token_latency_ms: NonNegFloat = 1.0
    prompt_latency_ms: NonNegFloat = 0.0
    output_tokens: PosInt = 16
    context_length: PosInt = 4096
    fail_every: NonNegInt = 0
    hang_after: NonNegInt = 0
    exit_after: NonNegInt = 0
    boot_fail: str = ""
    boot_delay_ms: NonNegFloat = 0.0


class Autoscale(_Base, kw_only=True):
    """Cold standby: start a cold worker when the pool's queue stays deep, stop it when idle."""

    queue_depth: PosInt = 50
    sustain_s: NonNegFloat = 10.0
    idle_s: PosFloat = 300.0


class Pool(_Base, kw_only=True):
    name: Name
    model: Name  # the name clients put in "model"
    engine: Literal["transformers", "fake"] = "transformers"
    model_path: str = ""  # "" = the embedded SmolLM2 under data_dir
    devices: list[str] = msgspec.field(default_factory=lambda: ["cpu"])  # one entry per replica slot: "cpu" or "cuda:N"
    replicas: Replicas = msgspec.field(default_factory=Replicas)
    autoscale: Autoscale = msgspec.field(default_factory=Autoscale)
    # int8: weight-only quantisation of the linear layers (torchao), computing in auto's dtype;
    # fp8: float8 weights and activations in the linear layers (backend/fp8.py; GPUs of compute
    # capability 8.9 or later, or the CPU), the rest in auto's dtype
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "fp8"] = "auto"
    max_batch_size: PosInt = 8
    # Sampling defaults for requests that leave temperature / top_p out (OpenAI's are 1.0 and 1.0).
    default_temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 1.0
    default_top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    max_inflight_per_worker: PosInt = 32
    # Cost-aware admission: estimated tokens (prompt + max_tokens) in flight per worker.
    max_tokens_inflight_per_worker: PosInt = 262144
    cpu_threads: NonNegInt = 0
    max_context: NonNegInt = 0  # tokens per sequence (prompt + output) in the KV cache; 0 = the model's maximum
    kv_cache_fraction: Annotated[float, msgspec.Meta(gt=0, le=0.98)] = 0.9  # of free GPU memory after loading
    cuda_graphs: bool = True  # capture the decode step in CUDA graphs (GPU only)
    # Chunked prefill: at most this many prompt tokens are prefilled per engine step, in their own
    # forward pass between the running requests' decode steps (a long prompt is split over
    # several steps, so it cannot stall the running streams for all of its length). 0 = off:
    # every admitted prompt at once, which measured faster for 128-token prompts on an H200
    # (docs/benchmarks.md §12). transformers engine only.
    prefill_budget_tokens: NonNegInt = 0
    # While sequences are decoding, an arriving request may wait up to this long for others to be
    # prefilled together with it: each prefill holds every running stream for about one decode
    # step, and 16 prompts together cost little more than one (docs/benchmarks.md §15). They go at
    # once when 16 have come, when they fill the free slots, or when nothing is running. 0 = every
    # arrival is prefilled at the next step.
    prefill_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.0
    # GPU with cuda_graphs: arrivals that fit a captured prefill graph are prefilled on a second
    # CUDA stream while the running streams' decode steps go on, and join at the next step
    # (docs/benchmarks.md §16); false = they are prefilled between two decode steps.
    overlap_prefill: bool = True
    # A stream's tokens are sent this many at a time - its first at once (time to first token), its
    # last with its end: each costs the worker a frame entry and the proxy an event and a socket
    # write, so 2-4 cuts their CPU per token about that much (docs/benchmarks.md §5) for text that
    # arrives a few tokens at a time (at most interval - 1 steps later). Requests that ask for
    # logprobs get every token at once. 1 = every token as it is made.
    stream_interval: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    verify_manifest: bool = True
    fake: FakeEngineSettings = msgspec.field(default_factory=FakeEngineSettings)


class Fallback(_Base, kw_only=True):
    """Graceful degradation: send this tier to a smaller model's pool while its own pool is
    saturated. Any threshold that is set and exceeded degrades; all must fall below
    `recover_ratio` x their threshold before requests go back (hysteresis)."""

    pool: Name
    queue_depth: Union[PosInt, None] = None  # requests waiting in the primary pool
    utilization: Union[Annotated[float, msgspec.Meta(gt=0, le=1)], None] = None  # active / capacity
    expected_wait_s: Union[PosFloat, None] = None  # recent queue waits (moving average)
    recover_ratio: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5


class Tier(_Base, kw_only=True):
    name: Name
    pool: Name
    weight: PosInt = 1
    max_concurrent: PosInt = 64
    max_queue: NonNegInt = 256
    queue_timeout_s: PosFloat = 10.0
    # Streaming-aware timeouts; unset = the global ones under `timeouts`.
    first_token_s: Union[PosFloat, None] = None
    idle_s: Union[PosFloat, None] = None
    fallback: Union[Fallback, None] = None  # none by default: premium tiers never degrade unless told


class ApiKey(_Base, kw_only=True):
    name: Name
    key: Annotated[str, msgspec.Meta(min_length=8)]
    tier: Name
    callback_secret: str = ""  # signs this key's job callbacks (HMAC-SHA256); needed to use callback_url
    requests_per_second: Union[PosFloat, None] = None  # token bucket
    requests_burst: Union[PosInt, None] = None  # requests the bucket holds; unset = max(1, requests_per_second)
    tokens_per_minute: Union[PosInt, None] = None  # prompt + max_tokens, refunded down to the tokens used
    pools: list[Name] = []  # pools beyond its tier's pool whose models this key may call


class Auth(_Base, kw_only=True):
    allow_anonymous: bool = False
    anonymous_tier: str = ""
    keys: list[ApiKey] = []


class Workers(_Base, kw_only=True):
    heartbeat_interval_s: PosFloat = 1.0
    missed_heartbeats: PosInt = 3
    engine_stall_timeout_s: PosFloat = 120.0
    boot_timeout_s: PosFloat = 600.0
    stop_grace_s: NonNegFloat = 10.0
    restart_backoff_initial_s: PosFloat = 1.0
    restart_backoff_max_s: PosFloat = 60.0
    # Workers outlive a proxy that dies (crash, SIGKILL) with their models loaded, and the next proxy
    # adopts them; one with no proxy for this long exits. 0 = workers die with the proxy.
    orphan_timeout_s: NonNegFloat = 300.0


class Limits(_Base, kw_only=True):
    max_body_bytes: PosInt = 1 << 20
    max_tokens_default: PosInt = 512
    max_header_count: PosInt = 100
    max_header_bytes: Annotated[int, msgspec.Meta(ge=256)] = 8190  # one header line, and the request line
    header_timeout_s: PosFloat = 60.0  # request head complete within this (also the idle keep-alive timeout)
    body_timeout_s: PosFloat = 30.0  # whole body received within this
    trusted_proxies: list[str] = []  # addresses/CIDRs whose X-Forwarded-For is believed


class Timeouts(_Base, kw_only=True):
    first_token_s: PosFloat = 120.0
    idle_s: PosFloat = 60.0
    keepalive_comment_s: PosFloat = 15.0  # an SSE comment when a stream is idle this long
    # A stream whose client does not take its bytes (socket send buffer full) for this long is
    # cancelled and its admission slot freed: a client that stops reading cannot hold a slot.
    stream_write_s: PosFloat = 30.0
    drain_s: NonNegFloat = 30.0


class Outlier(_Base, kw_only=True):
    """Passive outlier detection and circuit breaking per worker (Envoy's defaults)."""

    consecutive_errors: PosInt = 5  # connection lost / timed out
    consecutive_5xx: PosInt = 3  # the worker reported an internal error
    base_eject_s: PosFloat = 30.0  # x times ejected, capped, +-10% jitter
    max_eject_s: PosFloat = 300.0
    restart_after_ejections: PosInt = 3  # ejected this often in a row: restart the process


class Cache(_Base, kw_only=True):
    """Coalescing of identical in-flight requests and an answer cache (memory, then disk)."""

    enabled: bool = True
    coalesce: bool = True
    ttl_s: PosFloat = 3600.0
    memory_bytes: NonNegInt = 64 << 20
    disk_bytes: NonNegInt = 1 << 30  # 0 = memory only
    disk_dir: str = ""  # "" = <data_dir>/cache
    # One cache per API key (default), or shared by all keys (opt-in: answers are reused across
    # keys, but the X-Fullpower-Cache header reports a hit only to the key that stored it).
    scope: Literal["shared", "key"] = "key"
    include_sampled: bool = False  # also share sampled requests (temperature > 0, no seed)


class Jobs(_Base, kw_only=True):
    """Async jobs: durable submission (SQLite on one host, PostgreSQL shared by several),
    execution at a low tier, signed callbacks."""

    enabled: bool = True
    store: Literal["sqlite", "postgresql"] = "sqlite"
    db_path: str = ""  # sqlite: "" = <data_dir>/jobs.sqlite3
    dsn: str = ""  # postgresql: postgresql://user@host:port/database (required with store: postgresql)
    # postgresql: a running job is leased to its host for this long and renewed every quarter of it;
    # a job whose host stopped renewing (dead, cut off) goes back to the queue for another host.
    lease_s: Annotated[float, msgspec.Meta(ge=3)] = 30.0
    max_db_bytes: NonNegInt = 1 << 30  # refuse new jobs (503) beyond this database size; 0 = no bound
    max_queued_per_key: PosInt = 10000  # one key's jobs waiting at once; more get 429
    max_metadata_bytes: PosInt = 16384  # a job's metadata, as JSON
    tier: str = ""  # the tier jobs run at; "" = the last (lowest) tier
    concurrency: PosInt = 16  # jobs running at once (they still pass admission at their tier)
    max_attempts: PosInt = 3
    expire_after_s: PosFloat = 86400.0  # a job not started by then is marked expired
    retention_s: PosFloat = 7 * 86400.0  # finished jobs are deleted after this
    callback_timeout_s: PosFloat = 10.0
    callback_retry_s: PosFloat = 3600.0  # keep retrying a failing callback for this long
    callback_allow: list[str] = []  # hosts and CIDRs callbacks may go to; loopback only when listed
    # Anonymous callers (auth.allow_anonymous) are one tenant; jobs are refused to them unless
    # this is set, and even then they can only fetch or cancel a job by its id (no listing, no
    # Idempotency-Key).
    allow_anonymous: bool = False


class Shared(_Base, kw_only=True):
    """State shared by several appliances through Redis: per-key rate limits, the answer cache's
    shared tier, cross-host single flight and the host registry. Empty redis_url: nothing shared."""

    redis_url: str = ""  # redis://host:port/db (or rediss://, unix://)
    key_prefix: Name = "fullpower"  # every Redis key starts with "<key_prefix>:"
    timeout_s: PosFloat = 0.25  # one Redis call; slower counts as unreachable (local fallback)
    retry_s: PosFloat = 2.0  # after a failure, local limits and cache for this long, then try again
    cache_max_entry_bytes: PosInt = 1 << 20  # larger answers stay in this host's cache only
    single_flight_s: PosFloat = 30.0  # a leader's lock expires after this; followers wait at most this long
    host_id: str = ""  # this appliance in the registry; "" = <hostname>:<listen port>
    advertise: str = ""  # the address other hosts and operators reach it at; "" = listen
    registry_ttl_s: Annotated[float, msgspec.Meta(ge=2)] = 15.0  # a host missing this long leaves the registry


class Routing(_Base, kw_only=True):
    slow_start_s: NonNegFloat = 30.0  # a (re)started worker's weight ramps from 10% over this
    retry_budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2  # retries in flight / active requests
    min_retry_concurrency: NonNegInt = 3  # retries always allowed up to this many at once
    max_attempts: PosInt = 3  # workers tried per request


class Config(_Base, kw_only=True):
    listen: str = "127.0.0.1:8080"  # "" = no public listener (jobs and the admin listener only)
    # chat/completions requests served by the fast lane (proxy/http/fast_lane.py); false: all by aiohttp.
    fast_lane: bool = True
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    # The admin listener's bearer token: this file's content; "" = <data_dir>/admin.token, created
    # (owner-only) with a random token at the first start. The CLI reads the same file.
    admin_token_file: str = ""
    data_dir: str = ""  # "" = $FULLPOWER_DATA_DIR, else $XDG_DATA_HOME/fullpower, else ~/.local/share/fullpower
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pools: list[Pool]
    tiers: list[Tier]
    auth: Auth = msgspec.field(default_factory=Auth)
    workers: Workers = msgspec.field(default_factory=Workers)
    limits: Limits = msgspec.field(default_factory=Limits)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    routing: Routing = msgspec.field(default_factory=Routing)
    outlier: Outlier = msgspec.field(default_factory=Outlier)
    cache: Cache = msgspec.field(default_factory=Cache)
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    shared: Shared = msgspec.field(default_factory=Shared)

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    def admin_token_path(self) -> Path:
        return Path(self.admin_token_file) if self.admin_token_file else self.resolved_data_dir() / "admin.token"

    def jobs_tier(self) -> str:
        return self.jobs.tier or self.tiers[-1].name

    def jobs_db(self) -> Path:
        return Path(self.jobs.db_path) if self.jobs.db_path else self.resolved_data_dir() / "jobs.sqlite3"

    def host_id(self) -> str:
        """This appliance's name among several (the registry, job leases): stable across restarts."""
        if self.shared.host_id:
            return self.shared.host_id
        import socket

        port = self.listen.rpartition(":")[2] if self.listen else self.admin_listen.rpartition(":")[2]
        return f"{socket.gethostname()}:{port}"

    def advertised_address(self) -> str:
        """Where other hosts and operators reach this appliance: shared.advertise, else listen
        (with this host's name in place of an unspecified address such as 0.0.0.0)."""
        if self.shared.advertise:
            return self.shared.advertise
        address = self.listen or self.admin_listen
        host, port = parse_host_port(address)
        if host in ("0.0.0.0", "::", ""):
            import socket

            return f"{socket.gethostname()}:{port}"
        return address

    def cache_dir(self) -> Path:
        return Path(self.cache.disk_dir) if self.cache.disk_dir else self.resolved_data_dir() / "cache"

    def model_dir(self, pool: Pool) -> Path:
        return model_dir(pool, self.resolved_data_dir())


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def model_dir(pool: Pool, data_dir: Path) -> Path:
    """The pool's model directory: its model_path, else the embedded SmolLM2 under data_dir."""
    return Path(pool.model_path) if pool.model_path else data_dir / "models" / EMBEDDED_MODEL_DIRNAME


def default_data_dir() -> Path:
    env = os.environ.get("FULLPOWER_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "fullpower"


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_config(text: str) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"(file): not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of settings"])
    from proxy.config_checks import cross_field_problems, type_problems  # they import the schema above

    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError:
        raise ConfigError(type_problems(raw) or ["(top level): invalid configuration"]) from None
    problems = cross_field_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror or exc}"]) from None
    return parse_config(text)
