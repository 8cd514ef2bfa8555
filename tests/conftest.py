"""Shared fixtures: real `fullpower serve` processes on free loopback ports, and model directories."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FULLPOWER = [PYTHON, "-m", "proxy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ADMIN_TOKEN = "test-admin-token-0123456789"  # every test server's admin token


def http_json(url: str, body=None, headers=None, method=None, timeout=30):
    """(status, headers, parsed JSON or raw text) for a request, without raising on HTTP errors.
    Requests to /admin/ paths carry the test servers' admin token unless they set Authorization."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    if "Authorization" not in h and urllib.parse.urlsplit(url).path.startswith("/admin/"):
        h["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, exc.headers
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Server:
    """A `fullpower serve` process with its own config, ports and log file."""

    def __init__(self, config: dict, tmp: Path, host: str = "127.0.0.1", command_prefix: tuple = ()) -> None:
        self.host = host  # another address: a host in a network namespace (command_prefix: ip netns exec)
        self.command_prefix = list(command_prefix)
        self.port, self.admin_port = free_port(), free_port()
        config = {**config, "listen": f"{host}:{self.port}", "admin_listen": f"{host}:{self.admin_port}"}
        config.setdefault("data_dir", str(tmp / "data"))
        token_file = tmp / "admin.token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        config.setdefault("admin_token_file", str(token_file))
        self.config = config
        self.config_path = tmp / f"fullpower-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def start(self, wait_ready: bool = True, timeout: float = 120) -> "Server":
        # Append: workers adopted from a killed proxy keep writing to the file they inherited.
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command_prefix + FULLPOWER + ["serve", "--config", str(self.config_path)],
                                     cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fullpower serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, body = http_json(self.url + "/readyz", timeout=2)
                # every hot worker ready (cold standby workers stay stopped until needed)
                if status == 200 and all(w["state"] in ("ready", "stopped") for w in self.pool()):
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout}s:\n{self.log()}")

    def pool(self) -> list[dict]:
        return http_json(self.admin + "/admin/pool", timeout=5)[2]["workers"]

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.pool() if w["pid"]]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"fullpower serve ignored {sig!r} for {timeout}s:\n{self.log()}")
        finally:
            self._log.close()


def run_under_triton_interpreter(code: str, *args: str) -> str:
    """Run `code` in a new Python with TRITON_INTERPRET=1 (Triton reads it when kernels are
    defined, hence a process of its own) and return its output; fails the test on a non-zero exit.
    How CI, which has no GPU, runs the engine's Triton kernels on the CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([PYTHON, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class RecordingTransport:
    """An asyncio transport that keeps what is written to it (for protocol-level tests of the
    proxy's connections: what goes out, in how many writes)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def fake_config(**pool_overrides) -> dict:
    """The bench-fake example (two fake workers, three keyed tiers), with overrides for the pool."""
    config = yaml.safe_load((ROOT / "config/examples/bench-fake.yaml").read_text())
    pool = config["pools"][0]
    fake = {**pool.get("fake", {}), **pool_overrides.pop("fake", {})}
    pool.update(pool_overrides)
    pool["fake"] = fake
    # Workers left by a killed proxy wait 15 s for adoption (not 5 minutes) in tests.
    config["workers"] = {"heartbeat_interval_s": 0.5, "restart_backoff_initial_s": 0.2, "stop_grace_s": 3,
                         "orphan_timeout_s": 15}
    return config


@pytest.fixture
def start_server(tmp_path):
    servers: list[Server] = []

    def start(config: dict, wait_ready: bool = True, timeout: float = 120) -> Server:
        server = Server(config, tmp_path)
        servers.append(server)
        return server.start(wait_ready=wait_ready, timeout=timeout)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fake_server(start_server) -> Server:
    return start_server(fake_config())


# --- model directories ------------------------------------------------------------------------


def embedded_model_dir() -> Path:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    return default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    path = embedded_model_dir()
    if not (path / "config.json").is_file():
        subprocess.run(FULLPOWER + ["model", "prepare"], check=True, cwd=ROOT)
    return path


@pytest.fixture(scope="session")
def embedded_server(embedded_model, tmp_path_factory):
    """`fullpower serve` with the shipped config (the real embedded model on CPU), shared by the
    modules that test what the model does through real clients."""
    import yaml

    config = yaml.safe_load((ROOT / "config/fullpower.yaml").read_text())
    tmp = tmp_path_factory.mktemp("e2e")
    # its own data (cache, jobs, token) in tmp: answers cached by an earlier run must not serve this one
    config["data_dir"] = str(tmp / "data")
    for pool in config["pools"]:
        pool["model_path"] = str(embedded_model)
    server = Server(config, tmp).start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model) -> Path:
    """A tiny random-weight Llama with the embedded model's tokenizer and chat template, plus a manifest."""
    out = tmp_path_factory.mktemp("tiny-model")
    code = f"""
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from backend.manifest import write_manifest
src, out = Path({str(embedded_model)!r}), Path({str(out)!r})
config = AutoConfig.from_pretrained(src)
config.hidden_size, config.intermediate_size = 64, 128
config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 2, 4, 2
config.head_dim = 16
config.max_position_embeddings = 256
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (src / name).exists():
        shutil.copy(src / name, out / name)
write_manifest(out)
"""
    subprocess.run([PYTHON, "-c", code], check=True, cwd=ROOT)
    return out


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (prometheus-client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    what = what() if callable(what) else what  # a description may report the state it ended in
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
