"""Helpers for tests of several appliances sharing state: a database of their own on the shared
PostgreSQL, a key prefix of their own on the shared Redis, private Redis and PostgreSQL servers to
stop and start, a TCP relay that can cut one host off, nginx in front of N appliances, and a
receiver for signed job callbacks."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

from loadtest.bench_fleet import render_fleet_nginx
from tests.conftest import fake_config, free_port, wait_until

PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
CALLBACK_SECRET = "fleet-callback-secret"


def psql(dsn: str, sql: str) -> str:
    return subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-qAtc", sql], check=True, capture_output=True,
                          text=True).stdout


class Database:
    """A database of its own on the shared PostgreSQL, dropped at the end."""

    def __init__(self) -> None:
        self.name = "fp_test_" + uuid.uuid4().hex[:12]
        psql(f"{PG}/postgres", f"CREATE DATABASE {self.name}")
        self.dsn = f"{PG}/{self.name}"

    def query(self, sql: str) -> str:
        return psql(self.dsn, sql)

    def drop(self) -> None:
        psql(f"{PG}/postgres", f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def redis_cleanup(url: str, prefix: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
        client.close()
    except redis.RedisError:
        pass


class PrivateRedis:
    """A redis-server of its own on a free port (nothing persisted), to stop and start again."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "PrivateRedis":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)], stdout=subprocess.DEVNULL)
        wait_until(lambda: _answers(self.port), what="redis-server up")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class PrivatePostgres:
    """A PostgreSQL server of its own (initdb, pg_ctl) on a free port, run as the postgres user
    (the server refuses root), to stop and start again."""

    def __init__(self, also_listen: str | None = None) -> None:
        self.port = free_port()
        self.addresses = "127.0.0.1" + (f",{also_listen}" if also_listen else "")
        self.dir = Path(tempfile.mkdtemp(prefix="fp-pg-"))
        user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._as = ["runuser", "-u", "postgres", "--"] if user is not None else []
        subprocess.run(self._as + ["initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust"],
                       check=True, capture_output=True)
        if also_listen:  # a host in a network namespace connects from the other end of its link
            with open(self.dir / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {also_listen}/24 trust\n")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> "PrivatePostgres":
        subprocess.run(self._as + ["pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                                   f"-p {self.port} -k {self.dir} -c listen_addresses={self.addresses}", "start"],
                       check=True, capture_output=True)
        return self

    def stop(self) -> None:
        subprocess.run(self._as + ["pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"],
                       capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class NetworkNamespace:
    """A host of its own on this machine: a network namespace joined to this one by a veth pair
    (`here` on this side, `there` inside). `cut()` takes this side's interface down - nothing
    crosses any more, and nothing is refused either: connections just hang, as on a real network
    partition - and `restore()` brings it back up."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name, self.outside, inside = f"fp{tag}", f"fpo{tag}", f"fpi{tag}"
        net = int(tag[:2], 16) % 250 + 1
        self.here, self.there = f"10.213.{net}.1", f"10.213.{net}.2"
        for cmd in (["netns", "add", self.name],
                    ["link", "add", self.outside, "type", "veth", "peer", "name", inside],
                    ["link", "set", inside, "netns", self.name],
                    ["addr", "add", f"{self.here}/24", "dev", self.outside],
                    ["link", "set", self.outside, "up"],
                    ["-n", self.name, "addr", "add", f"{self.there}/24", "dev", inside],
                    ["-n", self.name, "link", "set", inside, "up"],
                    ["-n", self.name, "link", "set", "lo", "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)

    @property
    def command_prefix(self) -> tuple:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.outside, "down"], check=True)

    def restore(self) -> None:
        subprocess.run(["ip", "link", "set", self.outside, "up"], check=True)

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)


def host_address(index: int) -> str:
    """Appliance `index` of a fleet gets an address of its own on the loopback network."""
    return f"127.0.0.{11 + index}"


def fleet_config(tmp: Path, index: int, dsn: str | None, redis_url: str | None, prefix: str,
                 fake: dict | None = None, **jobs) -> dict:
    """One appliance of a fleet: one fake worker, its own data directory, shared jobs and state."""
    config = fake_config(fake=fake or {"token_latency_ms": 1, "output_tokens": 8}, devices=["cpu"],
                         replicas={"hot": 1})
    config["data_dir"] = str(tmp / f"host-{index}")
    config["limits"] = {"trusted_proxies": ["127.0.0.0/8"]}
    for key in config["auth"]["keys"]:
        key["callback_secret"] = CALLBACK_SECRET
    if dsn is not None:
        config["jobs"] = {"store": "postgresql", "dsn": dsn, "lease_s": 3, "concurrency": 8,
                          "callback_allow": ["127.0.0.1/32"], **jobs}
    if redis_url is not None:
        # A generous timeout: on a busy 2-core test machine a call can stall for a while, and a
        # fallback to local state would make the cross-host assertions meaningless.
        config["shared"] = {"redis_url": redis_url, "key_prefix": prefix, "retry_s": 0.5, "registry_ttl_s": 3,
                            "timeout_s": 2.0}
    return config


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def start_fleet_nginx(tmp: Path, upstreams: list) -> tuple[subprocess.Popen, str, Path]:
    """nginx with deploy/nginx/fullpower-fleet.conf, its upstream lines pointed at `upstreams`
    (HOST:PORT, or ports on 127.0.0.1)."""
    port = free_port()
    conf = render_fleet_nginx(tmp / "nginx", upstreams, port)
    proc = subprocess.Popen([NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"])
    wait_until(lambda: _answers(port), what="nginx listening")
    return proc, f"http://127.0.0.1:{port}", conf.parent


class CallbackReceiver:
    """Records every signed job callback: job id -> list of (body, signature valid)."""

    def __init__(self) -> None:
        received: dict[str, list] = {}
        self.received = received
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                parts = dict(p.split("=", 1) for p in self.headers["X-Fullpower-Signature"].split(","))
                expected = hmac.new(CALLBACK_SECRET.encode(), parts["t"].encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
                job = json.loads(body)
                with lock:
                    received.setdefault(job["id"], []).append((job, hmac.compare_digest(expected, parts["v1"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def elapsed(since: float) -> float:
    return time.monotonic() - since
