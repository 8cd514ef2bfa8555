"""The recovery drill (the source design's five steps) against a backup, on a running host.

    python -m loadtest.drill --config CONFIG --backup DIR --pid SERVER_PID [--requests 50]
        [--model NAME] [--key SECRET]

1. stop the server (SIGTERM: it drains) - criterion: no active connections on its ports;
2. restore the backup, models first - criterion: every model file matches its manifest;
3. ... and the job store - criterion: integrity check ok, job counts equal the backup's;
4. start `fullpower serve` again - criterion: /readyz answers 200;
5. send traffic back - criterion: every one of --requests requests succeeds.

Each step prints its criterion and what was measured; the exit code is the number of failed steps.
The restarted server keeps running (detached); its pid is printed. Traffic goes to the config's
public listener on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config import load_config, parse_host_port

HERE = Path(__file__).resolve().parent.parent


def established(ports: set[int]) -> int:
    """TCP connections in ESTABLISHED state on these local ports (from /proc/net/tcp{,6})."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) in ports:
                count += 1
    return count


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def report(step: int, title: str, criterion: str, measured: str, ok: bool) -> bool:
    print(f"{step}. {title}\n   criterion: {criterion}\n   measured:  {measured}\n   {'PASS' if ok else 'FAIL'}",
          flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--backup", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the running server's process id")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--model", help="model to ask (default: the first pool's)")
    ap.add_argument("--key", default="drill", help="API key for the traffic step")
    ap.add_argument("--log", default="drill-serve.log", help="where the restarted server logs")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    host, port = parse_host_port(cfg.listen)
    if host not in ("127.0.0.1", "::1", "localhost"):
        host = "127.0.0.1"  # traffic stays on this machine
    ports = {port, parse_host_port(cfg.admin_listen)[1]}
    failed = 0

    # 1. stop
    os.kill(args.pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.timeouts.drain_s + cfg.workers.stop_grace_s + 10
    while time.monotonic() < deadline and running(args.pid):
        time.sleep(0.1)
    alive = running(args.pid)
    left = established(ports)
    failed += not report(1, "stop all services", "server exited; no active connections on its ports",
                         f"server {'still running' if alive else 'exited'}; {left} established connections",
                         not alive and left == 0)

    # 2 and 3. restore (models are checked before the database is touched)
    proc = subprocess.run([sys.executable, "-m", "proxy", "restore", args.backup, "--config", args.config],
                          capture_output=True, text=True, cwd=HERE)
    lines = proc.stdout.splitlines()
    model_lines = [line for line in lines if line.startswith("model of pool")]
    failed += not report(2, "restore model files", "every model file matches its manifest (checksums)",
                         "; ".join(model_lines) or (proc.stderr.strip() or "no model files in this config"),
                         proc.returncode == 0)
    store = [line for line in lines if line.startswith("job store restored")]
    failed += not report(3, "restore the database", "integrity check ok; job counts equal the backup's",
                         "; ".join(store) or proc.stderr.strip() or "no job store in the backup",
                         proc.returncode == 0)
    if proc.returncode:
        return failed + 2

    # 4. start
    log = open(args.log, "ab")
    server = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", args.config], cwd=HERE,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started, ready = time.monotonic(), False
    while time.monotonic() - started < 300 and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as resp:
                ready = resp.status == 200
        except (urllib.error.URLError, OSError):
            pass
        if ready:
            break
        time.sleep(0.2)
    failed += not report(4, "start", "health checks pass (/readyz 200)",
                         f"ready after {time.monotonic() - started:.1f}s (pid {server.pid})" if ready
                         else "not ready", ready)
    if not ready:
        return failed + 1

    # 5. traffic
    model = args.model or cfg.pools[0].model
    errors = []
    t0 = time.monotonic()
    for i in range(args.requests):
        body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": f"drill request {i}"}]}).encode()
        req = urllib.request.Request(f"http://{host}:{port}/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {args.key}", "Cache-Control": "no-cache"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                if resp.status != 200:
                    errors.append(resp.status)
        except (urllib.error.URLError, OSError) as exc:
            errors.append(getattr(exc, "code", repr(exc)))
    failed += not report(5, "send traffic back", f"{args.requests} requests, zero errors",
                         f"{args.requests - len(errors)}/{args.requests} succeeded in {time.monotonic() - t0:.1f}s"
                         + (f"; errors: {errors[:5]}" if errors else ""), not errors)
    print(f"drill {'passed' if not failed else f'FAILED ({failed} steps)'}; server running as pid {server.pid}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
