"""Several appliances behind nginx vs one: requests/s of a closed loop through nginx (the shipped
deploy/nginx/fullpower-fleet.conf), fake workers at 20 ms per token, the appliances sharing state
through Redis as a fleet does. Each appliance has one fake worker admitting `--inflight`
requests at once, so one appliance serves about inflight / (tokens x 20 ms) requests/s; the
load (`--clients`) is enough to keep every appliance of the larger fleet full.

    python -m loadtest.bench_fleet [--hosts 3] [--duration 15] [--clients 96]

Loopback only; bounded in time. Needs nginx and a Redis at --redis (127.0.0.1:6379 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from loadtest.bench_proxy import ROOT, fake_bench_config, free_port, start_server, wait_port
from loadtest.nginx import nginx_binary, nginx_prefix


def render_fleet_nginx(root: Path, upstreams: list[str | int], listen_port: int) -> Path:
    """deploy/nginx/fullpower-fleet.conf with its upstream lines on `upstreams` (HOST:PORT, or a
    port on 127.0.0.1), in a private nginx prefix under `root`; returns the main config file
    (checked with `nginx -t`)."""
    site = (ROOT / "deploy/nginx/fullpower-fleet.conf").read_text()
    lines = [line for line in site.splitlines() if "server 10.0.0." not in line]
    at = next(i for i, line in enumerate(lines) if "hash $fullpower_affinity" in line) + 1
    addresses = [u if isinstance(u, str) else f"127.0.0.1:{u}" for u in upstreams]
    lines[at:at] = [f"    server {a} max_fails=2 fail_timeout=5s;" for a in addresses]
    site = "\n".join(lines).replace("listen 80;", f"listen 127.0.0.1:{listen_port};")
    return nginx_prefix(root, "fullpower-fleet.conf", site, worker_connections=4096, access_log=False)


async def closed_loop(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    """`clients` loops posting non-streaming chat requests for `duration` seconds."""
    ok = errors = 0
    stop_at = time.monotonic() + duration
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "fleet benchmark"}],
               "max_tokens": max_tokens, "temperature": 1.0}  # sampled: never cached, always generated
    headers = {"Authorization": "Bearer sk-test-standard"}

    async def loop(session: aiohttp.ClientSession) -> None:
        nonlocal ok, errors
        while time.monotonic() < stop_at:
            try:
                async with session.post(url + "/v1/chat/completions", json=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(loop(session) for _ in range(clients)))
    elapsed = time.monotonic() - started
    return {"requests_per_s": ok / elapsed, "ok": ok, "errors": errors, "seconds": elapsed}


def run_fleet(n: int, args, tmp: Path, prefix: str) -> dict:
    procs: list[subprocess.Popen] = []
    try:
        ports = []
        for i in range(n):
            config, port, _ = fake_bench_config(tmp / f"{n}-host-{i}", devices=["cpu"], replicas={"hot": 1},
                                                max_inflight_per_worker=args.inflight, max_batch_size=args.inflight,
                                                fake={"token_latency_ms": 20, "output_tokens": args.tokens})
            config["limits"] = {"trusted_proxies": ["127.0.0.1"]}
            config["jobs"] = {"enabled": False}
            config["shared"] = {"redis_url": args.redis, "key_prefix": prefix}
            (tmp / f"{n}-host-{i}").mkdir(parents=True, exist_ok=True)
            procs.append(start_server(config, tmp / f"{n}-host-{i}.yaml", port))
            ports.append(port)
        listen = free_port()
        conf = render_fleet_nginx(tmp / f"nginx-{n}", ports, listen)
        procs.append(subprocess.Popen([nginx_binary(), "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]))
        wait_port(listen)
        url = f"http://127.0.0.1:{listen}"
        asyncio.run(closed_loop(url, args.clients, 2.0, args.tokens))  # warm up connections
        return asyncio.run(closed_loop(url, args.clients, args.duration, args.tokens))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=96)
    parser.add_argument("--inflight", type=int, default=16, help="requests one appliance's worker runs at once")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer (20 ms each)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    prefix = "fpbench" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="fp-fleet-") as tmp:
        one = run_fleet(1, args, Path(tmp), prefix)
        many = run_fleet(args.hosts, args, Path(tmp), prefix)
    ideal = args.inflight / (args.tokens * 0.020)
    print(f"fake workers: {args.tokens} tokens x 20 ms, {args.inflight} at once per appliance "
          f"(ideal {ideal:.0f} req/s per appliance); {args.clients} clients through nginx, {args.duration:.0f} s")
    print(f"1 appliance:  {one['requests_per_s']:8.1f} req/s  ({one['ok']} ok, {one['errors']} errors)")
    print(f"{args.hosts} appliances: {many['requests_per_s']:8.1f} req/s  ({many['ok']} ok, {many['errors']} errors)")
    print(f"ratio: {many['requests_per_s'] / one['requests_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
