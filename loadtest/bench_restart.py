"""Proxy restart without reloading models: the proxy SIGKILLed under load with the embedded model
on CPU, a new proxy started at once. Measures, in one run: the cold start (proxy and workers
loading the model) and the restart (the new proxy adopting the running workers), each from the
moment `fullpower serve` is started to the first answered one-token request, and whether the
worker pids stayed the same.

    python -m loadtest.bench_restart [--workers 2] [--clients 4] [--rounds 3]

`--activation`: instead, graceful restarts under an open-loop 50 requests/s with socket activation
(this script holds the listening socket and passes it to each start, as systemd's .socket unit
does; fake workers): one `systemctl restart` (SIGTERM, then start) and one hand-over (SIGUSR2, then
start), counting refused connections and failed requests.

Loopback only, bounded in time; needs `fullpower model prepare` (make model) first.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from loadtest.bench_proxy import ROOT, free_port
from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

KEY = "sk-bench-restart-key"


def post(url: str, timeout: float = 30, max_tokens: int = 8) -> int:
    body = json.dumps({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi."}],
                       "max_tokens": max_tokens, "temperature": 0.7}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                                        "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # refused or reset: the proxy is down


def first_answer(url: str, proc: subprocess.Popen, started: float, timeout: float = 600) -> float:
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"fullpower serve exited with {proc.returncode}")
        if post(url, timeout=10, max_tokens=1) == 200:  # one token: serving, not generation speed
            return time.monotonic() - started
        time.sleep(0.01)
    raise RuntimeError("no answer")


def pids(admin: str, token: str) -> list[int]:
    req = urllib.request.Request(admin + "/admin/pool", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return sorted(w["pid"] for w in json.loads(resp.read())["workers"])


def activation(rate: float, seconds: float) -> int:
    """Graceful restarts under an open-loop `rate` with the listening socket held across them."""
    import concurrent.futures
    import os
    import socket

    from loadtest.bench_proxy import fake_bench_config

    with tempfile.TemporaryDirectory(prefix="fp-activation-") as tmp:
        tmp = Path(tmp)
        config, port, admin_port = fake_bench_config(tmp / "data", fake={"token_latency_ms": 5, "output_tokens": 8})
        config["auth"]["keys"].append({"name": "bench", "key": KEY, "tier": "standard"})
        path = tmp / "fullpower.yaml"
        path.write_text(yaml.safe_dump(config))
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", port))
        held.listen(4096)
        log = open(tmp / "serve.log", "ab")
        url = f"http://127.0.0.1:{port}"

        def start() -> subprocess.Popen:
            cmd = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=public exec "$@"', "sh",
                   sys.executable, "-m", "proxy", "serve", "--config", str(path)]
            def pass_socket() -> None:  # as descriptor 3, open across exec (sd_listen_fds)
                if held.fileno() == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(held.fileno(), 3)
            return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, close_fds=False,
                                    preexec_fn=pass_socket)

        def fake_post() -> int:
            body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 8}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                                                "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        proc = start()
        try:
            first_answer_any(url, proc)
        except RuntimeError:
            log.flush()
            print((tmp / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise
        results: list = []
        events: list[str] = []
        restarted: list[subprocess.Popen] = []  # each new process, started once the previous one exited
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            begun = time.monotonic()
            futures = []
            for i in range(int(rate * seconds)):
                time.sleep(max(0.0, begun + i / rate - time.monotonic()))
                futures.append(pool.submit(fake_post))
                elapsed = time.monotonic() - begun
                if not events and elapsed > seconds * 0.25:
                    events.append("SIGTERM + start (systemctl restart)")
                    proc.send_signal(signal.SIGTERM)
                    threading.Thread(target=lambda: (proc.wait(), restarted.append(start()))).start()
                elif len(events) == 1 and elapsed > seconds * 0.6 and restarted:
                    events.append("SIGUSR2 + start (hand-over)")
                    current = restarted[-1]
                    current.send_signal(signal.SIGUSR2)
                    threading.Thread(target=lambda: (current.wait(), restarted.append(start()))).start()
            results = [f.result() for f in futures]
        last = restarted[-1] if restarted else proc
        time.sleep(0.5)
        last.send_signal(signal.SIGTERM)
        last.wait(60)
        held.close()
        log.close()
    counts: dict[int, int] = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    print(f"{len(results)} requests open-loop at {rate:.0f}/s over {seconds:.0f} s, fake workers, the listening "
          f"socket held across restarts; restarts: {'; '.join(events)}")
    print(f"outcomes (status: count; 0 = refused or reset): {dict(sorted(counts.items()))}")
    return 0 if set(counts) == {200} else 1


def first_answer_any(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"fullpower serve exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("never ready")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients running through the kill")
    parser.add_argument("--rounds", type=int, default=3, help="SIGKILL-and-restart rounds")
    parser.add_argument("--log", type=Path, help="keep the servers' log here")
    parser.add_argument("--activation", action="store_true", help="graceful restarts under load with socket activation")
    parser.add_argument("--rate", type=float, default=50.0, help="--activation: requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="--activation: how long")
    args = parser.parse_args(argv)
    if args.activation:
        return activation(args.rate, args.seconds)
    model = default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME
    if not (model / "config.json").is_file():
        print(f"no prepared model at {model}: run `make model` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fp-restart-") as tmp:
        tmp = Path(tmp)
        port, admin_port = free_port(), free_port()
        token = "bench-restart-admin-token"
        (tmp / "admin.token").write_text(token)
        config = yaml.safe_load((ROOT / "config/fullpower.yaml").read_text())
        config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}", data_dir=str(tmp / "data"),
                      admin_token_file=str(tmp / "admin.token"), log_level="info")
        pool = config["pools"][0]
        pool.update(model_path=str(model), devices=["cpu"] * args.workers, replicas={"hot": args.workers})
        config["auth"] = {"keys": [{"name": "bench", "key": KEY, "tier": config["tiers"][0]["name"]}]}
        path = tmp / "fullpower.yaml"
        path.write_text(yaml.safe_dump(config))
        url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        log = open(tmp / "serve.log", "ab")

        def serve() -> tuple[subprocess.Popen, float]:
            started = time.monotonic()
            return subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT), started

        proc, started = serve()
        cold = first_answer(url, proc, started)
        before = pids(admin, token)
        outcomes: dict[int, int] = {}
        stop = threading.Event()

        def client():
            while not stop.is_set():
                status = post(url)
                outcomes[status] = outcomes.get(status, 0) + 1
                if status == 0:
                    time.sleep(0.05)  # like a real client retrying: not a busy loop on a refused port

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        restarts, same = [], True
        try:
            for _ in range(args.rounds):
                time.sleep(2.0)  # under load
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc, started = serve()
                restarts.append(first_answer(url, proc, started))
                same = same and pids(admin, token) == before
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()
            if args.log:
                args.log.write_bytes((tmp / "serve.log").read_bytes())
    print(f"embedded model on CPU, {args.workers} workers, {args.clients} clients through each kill")
    print(f"cold start (workers load the model): {cold:6.2f} s to the first answer")
    print(f"restart after SIGKILL (adoption):    {statistics.median(restarts):6.2f} s median to the first answer "
          f"({', '.join(f'{r:.2f}' for r in restarts)})")
    print(f"ratio cold / restart: {cold / statistics.median(restarts):.1f}x; worker pids unchanged: {same}")
    print(f"client outcomes (status: count; 0 = refused while no proxy listened): {dict(sorted(outcomes.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
