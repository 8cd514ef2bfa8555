"""`make bench`: the proxy benchmark, every case on this machine in one run, interleaved.

(a) a minimal aiohttp upstream stub called directly; (b) Debian's nginx proxying that stub;
(c) fullpower with fake-engine workers at zero token latency (every request reaches a worker);
(d) fullpower answering from its cache; (c) and (d) again with the fast lane off (every request
through aiohttp), side by side. Saturation req/s with wrk (rounds interleaved, median
taken), latency at a fixed rate with the open-loop load generator, streaming tokens/s through
fullpower vs straight from a worker, idle keep-alive connections, and proxy memory at a steady rate.
Loopback only; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from loadtest.report import write_json

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def fake_bench_config(data_dir: Path, **pool) -> tuple[dict, int, int]:
    """bench-fake.yaml on free loopback ports with the pool settings given: (config, port, admin port)."""
    config = yaml.safe_load((ROOT / "config/examples/bench-fake.yaml").read_text())
    port, admin = free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}", data_dir=str(data_dir),
                  log_level="warning", admin_token_file=str(data_dir / "admin.token"))
    config["pools"][0].update(pool)
    return config, port, admin


def start_server(config: dict, path: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """`fullpower serve` with this config (written to `path`), once /readyz answers on `port`."""
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([PY, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT)
    wait_port(port, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("fullpower never became ready")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Stack:
    """The stub, nginx in front of it, and a fullpower server with fake workers."""

    def __init__(self, tmp: Path, cache: bool = True, root: Path = ROOT) -> None:
        self.tmp = tmp
        self.cache = cache
        self.root = root  # the checkout whose fullpower runs (loadtest.bench_request_cpu compares two)
        self.procs: list[subprocess.Popen] = []
        self.stub_port, self.nginx_port, self.fp_port, self.fp_admin = (free_port() for _ in range(4))

    def start(self) -> None:
        self.procs.append(subprocess.Popen([PY, "-m", "loadtest.stub", str(self.stub_port)], cwd=self.root))
        (self.tmp / "logs").mkdir()
        conf = self.tmp / "nginx.conf"
        conf.write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
worker_rlimit_nofile 65536;
error_log {self.tmp}/logs/error.log error;
pid {self.tmp}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {self.tmp}/body; proxy_temp_path {self.tmp}/proxy;
    fastcgi_temp_path {self.tmp}/fcgi; uwsgi_temp_path {self.tmp}/uwsgi; scgi_temp_path {self.tmp}/scgi;
    upstream stub {{ server 127.0.0.1:{self.stub_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{self.nginx_port};
        location / {{ proxy_pass http://stub; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.procs.append(subprocess.Popen([nginx, "-p", str(self.tmp), "-c", str(conf), "-g", "daemon off;"]))
        config = yaml.safe_load((self.root / "config/examples/bench-fake.yaml").read_text())
        config["listen"], config["admin_listen"] = f"127.0.0.1:{self.fp_port}", f"127.0.0.1:{self.fp_admin}"
        config["data_dir"] = str(self.tmp / "data")
        pool = config["pools"][0]
        pool["fake"] = {"token_latency_ms": 0, "output_tokens": 8}
        pool["max_inflight_per_worker"] = 512
        for tier in config["tiers"]:
            tier.update(max_concurrent=1024, max_queue=4096)
        config["log_level"] = "warning"
        config["cache"] = {"enabled": self.cache}
        path = self.tmp / "fullpower.yaml"
        path.write_text(yaml.safe_dump(config))
        self.fullpower = subprocess.Popen([PY, "-m", "proxy", "serve", "--config", str(path)], cwd=self.root)
        self.procs.append(self.fullpower)
        for port in (self.stub_port, self.nginx_port, self.fp_port):
            wait_port(port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.fp_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fullpower never became ready")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def chat_body(temperature: float, prompt: str = "benchmark prompt") -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": temperature}


def wrk(url: str, body: dict, duration: float, connections: int, tmp: Path) -> dict:
    script = tmp / f"wrk-{abs(hash(json.dumps(body)))}.lua"
    script.write_text('wrk.method = "POST"\n'
                      f"wrk.body = {json.dumps(json.dumps(body))}\n"
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      'wrk.headers["Authorization"] = "Bearer sk-test-premium"\n'
                      'done = function(summary, latency, requests)\n'
                      '  io.write(string.format("JSON {\\"rps\\": %f, \\"p50\\": %f, \\"p99\\": %f, \\"errors\\": %d, '
                      '\\"non2xx\\": %d}\\n", summary.requests / (summary.duration / 1e6), latency:percentile(50), '
                      'latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write + '
                      'summary.errors.timeout, summary.errors.status))\n'
                      'end\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    line = next(l for l in out.splitlines() if l.startswith("JSON "))
    return json.loads(line[5:])


def fixed_rate(url: str, body: dict, rate: float, duration: float) -> dict:
    from loadtest.runner import run_workload
    from loadtest.workload import TierMix, Workload

    w = Workload(url=url, admin_url=url, model="fake-model", mode="open", rate=rate, duration_s=duration,
                 tiers={"premium": TierMix(key="sk-test-premium")}, stream_share=0.0, prompt_words=(3, 3),
                 max_tokens=(8, 8))
    # Same request every time: the body's temperature decides bypass (workers) or cache hit.
    import loadtest.runner as runner
    original = runner.RequestFactory.next

    def fixed(self):
        self.n += 1
        return "premium", "sk-test-premium", {**body, "stream": False}
    runner.RequestFactory.next = fixed
    try:
        run = asyncio.run(run_workload(w, progress=False))
    finally:
        runner.RequestFactory.next = original
    ok = sorted(r.total_s for r in run.results if r.status == 200)
    from loadtest.report import percentile
    return {"ok": len(ok), "total": len(run.results), "p50_ms": percentile(ok, 50) * 1000,
            "p99_ms": percentile(ok, 99) * 1000}


async def _stream_tps(url: str, max_tokens: int) -> float:
    import aiohttp
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "temperature": 0.5, "stream": True}
    best = 0.0
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            started, tokens = time.perf_counter(), 0
            async with s.post(url + "/v1/chat/completions", json=body,
                              headers={"Authorization": "Bearer sk-test-premium"}) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {") and b'"content":' in line:
                        tokens += 1
            best = max(best, tokens / (time.perf_counter() - started))
    return best


def streaming(stack: Stack, max_tokens: int) -> dict:
    from backend.protocol import WorkerSettings
    from loadtest.direct_worker import stream_tokens_per_s

    settings = WorkerSettings(engine="fake", model_name="fake-model", fake_token_latency_ms=0,
                              fake_output_tokens=max_tokens)
    direct = asyncio.run(stream_tokens_per_s(settings, max_tokens))
    # through fullpower: a second server whose fake workers emit long outputs
    proxied = asyncio.run(_stream_tps(f"http://127.0.0.1:{stack.fp_port_long}", max_tokens))
    return {"direct_tps": direct, "proxied_tps": proxied,
            "per_token_overhead_ms": (1 / proxied - 1 / direct) * 1000}


async def _idle_connections(port: int, n: int) -> dict:
    conns = []
    for _ in range(n):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError as exc:
            return {"opened": len(conns), "error": str(exc)}
    import aiohttp
    ok = 0
    async with aiohttp.ClientSession() as s:
        for _ in range(50):
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body(0.5),
                              headers={"Authorization": "Bearer sk-test-premium"}) as resp:
                ok += resp.status == 200
    for _, w in conns:
        w.close()
    return {"opened": len(conns), "requests_ok_meanwhile": ok}


def memory(stack: Stack, rate: float, duration: float) -> dict:
    from loadtest.runner import run_workload
    from loadtest.workload import TierMix, Workload

    samples = []
    w = Workload(url=f"http://127.0.0.1:{stack.fp_port}", admin_url=f"http://127.0.0.1:{stack.fp_admin}",
                 mode="open", rate=rate, duration_s=duration, tiers={"p": TierMix(key="sk-test-premium")},
                 stream_share=0.3, duplicate_share=0.2, max_tokens=(8, 8))

    async def sampler():
        while True:
            await asyncio.sleep(duration / 20)
            samples.append(rss_kib(stack.fullpower.pid))

    async def both():
        task = asyncio.create_task(sampler())
        run = await run_workload(w, progress=False)
        task.cancel()
        return run
    run = asyncio.run(both())
    steady = samples[len(samples) // 4:]  # after warm-up
    mean = statistics.mean(steady)
    return {"rate": rate, "duration_s": duration, "requests": len(run.results),
            "ok": sum(r.status == 200 for r in run.results), "rss_mib_min": min(steady) / 1024,
            "rss_mib_max": max(steady) / 1024, "deviation_pct": max(abs(s - mean) for s in steady) / mean * 100,
            "rss_mib_samples": [round(s / 1024, 1) for s in samples]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_proxy", description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed-rate latency phase (req/s)")
    parser.add_argument("--idle-connections", type=int, default=10000)
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of the memory phase (the goal: 600)")
    parser.add_argument("--only", choices=["memory"], help="run one phase alone (e.g. the 10-minute soak)")
    parser.add_argument("--no-cache", action="store_true", help="fullpower with its answer cache off")
    parser.add_argument("--out", default="reports/bench-proxy.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-bench-"))
    stack = Stack(tmp, cache=not args.no_cache)
    results: dict = {"machine": f"{os.cpu_count()} cores, {os.uname().release}", "args": vars(args)}
    try:
        stack.start()
        # a second fullpower whose workers stream long outputs (for the streaming phase)
        long_cfg = yaml.safe_load((tmp / "fullpower.yaml").read_text())
        stack.fp_port_long = free_port()
        long_cfg["listen"], long_cfg["admin_listen"] = f"127.0.0.1:{stack.fp_port_long}", f"127.0.0.1:{free_port()}"
        long_cfg["pools"][0]["fake"] = {"token_latency_ms": 0, "output_tokens": 4000}
        long_cfg["data_dir"] = str(tmp / "data-long")
        (tmp / "long.yaml").write_text(yaml.safe_dump(long_cfg))
        long_proc = subprocess.Popen([PY, "-m", "proxy", "serve", "--config", str(tmp / "long.yaml")], cwd=ROOT)
        stack.procs.append(long_proc)
        # and a third, the same as the first with its fast lane off (every request through aiohttp):
        # the two HTTP paths side by side in one run
        plain_cfg = yaml.safe_load((tmp / "fullpower.yaml").read_text())
        fp_port_plain = free_port()
        plain_cfg.update(listen=f"127.0.0.1:{fp_port_plain}", admin_listen=f"127.0.0.1:{free_port()}",
                         data_dir=str(tmp / "data-plain"), fast_lane=False)
        (tmp / "plain.yaml").write_text(yaml.safe_dump(plain_cfg))
        stack.procs.append(subprocess.Popen([PY, "-m", "proxy", "serve", "--config", str(tmp / "plain.yaml")],
                                            cwd=ROOT))
        wait_port(stack.fp_port_long)
        wait_port(fp_port_plain)
        time.sleep(2)

        if args.only == "memory":
            results["memory"] = memory(stack, 300.0, args.soak)
            return write_json(results, args.out)
        cases = {
            "a_stub_direct": (f"http://127.0.0.1:{stack.stub_port}/v1/chat/completions", chat_body(0.5)),
            "b_nginx_to_stub": (f"http://127.0.0.1:{stack.nginx_port}/v1/chat/completions", chat_body(0.5)),
            "c_fullpower_workers": (f"http://127.0.0.1:{stack.fp_port}/v1/chat/completions", chat_body(0.5)),
            "d_fullpower_cache_hit": (f"http://127.0.0.1:{stack.fp_port}/v1/chat/completions", chat_body(0.0)),
            "c_fullpower_workers_aiohttp": (f"http://127.0.0.1:{fp_port_plain}/v1/chat/completions", chat_body(0.5)),
            "d_fullpower_cache_hit_aiohttp": (f"http://127.0.0.1:{fp_port_plain}/v1/chat/completions",
                                              chat_body(0.0)),
        }
        runs: dict[str, list] = {k: [] for k in cases}
        for r in range(args.rounds):
            for name, (url, body) in cases.items():
                runs[name].append(wrk(url, body, args.duration, args.connections, tmp))
                print(f"round {r + 1} {name}: {runs[name][-1]['rps']:.0f} req/s", file=sys.stderr)
        sat = {name: {"rps_median": statistics.median(x["rps"] for x in v),
                      "p50_ms": statistics.median(x["p50"] for x in v) / 1000,
                      "p99_ms": statistics.median(x["p99"] for x in v) / 1000,
                      "errors": sum(x["errors"] + x["non2xx"] for x in v)} for name, v in runs.items()}
        nginx = sat["b_nginx_to_stub"]["rps_median"]
        for v in sat.values():
            v["vs_nginx"] = v["rps_median"] / nginx
        results["saturation"] = sat

        fixed = {}
        for name in ("a_stub_direct", "c_fullpower_workers", "d_fullpower_cache_hit"):
            url, body = cases[name]
            fixed[name] = fixed_rate(url.rsplit("/v1/", 1)[0], body, args.rate, args.duration)
        base = fixed["a_stub_direct"]
        for name in ("c_fullpower_workers", "d_fullpower_cache_hit"):
            fixed[name]["added_p50_ms"] = fixed[name]["p50_ms"] - base["p50_ms"]
            fixed[name]["added_p99_ms"] = fixed[name]["p99_ms"] - base["p99_ms"]
        results["fixed_rate"] = fixed
        results["streaming"] = streaming(stack, 2000)
        results["idle_connections"] = asyncio.run(_idle_connections(stack.fp_port, args.idle_connections))
        results["memory"] = memory(stack, 300.0, args.soak)
    finally:
        stack.stop()
    return write_json(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
