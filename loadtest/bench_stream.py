"""The streaming token path: proxy CPU per delivered token at many concurrent streams.

`python -m loadtest.bench_stream [--streams 256] [--duration 15] [--token-ms 5] [--tokens 128]`
starts `fullpower serve` with one fake-engine worker (the given per-token latency, a batch as
large as the stream count, cache off), then runs a closed loop of `--streams` streaming chat
requests from a separate client process for `--duration` seconds. It reports delivered tokens/s
(from each stream's usage, apportioned over the stream's life so that streams the window cuts
count in part; `completed_tok_s` counts only streams that ended inside it), the proxy process's
CPU time over the window (utime + stime from /proc, so the client and worker are not counted),
and their ratio: **µs of proxy CPU per token** (`proxy_system_fraction`: the kernel's part of it).
`--perf FILE` also samples the proxy with `perf record` over the window, to read where its CPU goes
(`perf report -i FILE --no-children --sort dso,symbol -g none`).
The same worker driven straight over the worker protocol gives the ceiling (`direct_tok_s`).
Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.bench_proxy import PY, ROOT, fake_bench_config, start_server

CLIENT = r"""
import asyncio, json, sys, time
import aiohttp
url, streams, duration, tokens, model = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
temperature = float(sys.argv[6])
body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": tokens, "ignore_eos": True,
        "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
import random
SAMPLES = 20000  # latency samples kept per client (reservoir): bounded memory, unbiased percentiles
async def main():
    done = {"tokens": 0, "streams": 0, "errors": 0, "window_tokens": 0.0}
    ttft, itl, seen = [], [], [0, 0]
    def keep(values, k, value):
        seen[k] += 1
        if len(values) < SAMPLES:
            values.append(value)
        else:
            j = random.randrange(seen[k])
            if j < SAMPLES:
                values[j] = value
    begin = time.monotonic()
    stop = begin + duration
    async def one():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            while time.monotonic() < stop:
                try:
                    sent = time.monotonic()
                    last = first = None
                    async with s.post(url + "/v1/chat/completions", json=body,
                                      headers={"Authorization": "Bearer sk-test-premium"}) as resp:
                        usage = None
                        async for line in resp.content:
                            if first is None and line.startswith(b'data: {'):
                                first = time.monotonic()
                            if line.startswith(b'data: {') and b'"content":' in line:
                                now = time.monotonic()
                                if last is None:
                                    keep(ttft, 0, now - sent)
                                else:
                                    keep(itl, 1, now - last)
                                last = now
                            if line.startswith(b'data: {') and b'"usage":{' in line:
                                usage = json.loads(line[6:])["usage"]
                    end = time.monotonic()
                    if usage and end <= stop:
                        done["tokens"] += usage["completion_tokens"]
                        done["streams"] += 1
                    if usage and first is not None:
                        # the stream's tokens spread evenly from its first chunk to its end; the
                        # part inside [begin, stop] counts, so a stream cut by the window counts in part
                        span = end - first
                        share = (min(end, stop) - max(first, begin)) / span if span > 0 else float(end <= stop)
                        done["window_tokens"] += usage["completion_tokens"] * max(0.0, share)
                except Exception:
                    done["errors"] += 1
    await asyncio.gather(*(one() for _ in range(streams)))
    done["ttft"], done["itl"] = ttft, itl
    print(json.dumps(done))
asyncio.run(main())
"""


def cpu_times(pid: int) -> tuple[float, float]:
    """The process's (user, system) CPU seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def children(pid: int) -> list[int]:
    """The process's direct children (a server's worker processes)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def measure(url: str, server_pid: int, streams: int, duration: float, tokens: int, model: str = "fake-model",
            key: str = "sk-test-premium", clients: int = 1, temperature: float = 0.7, perf_out: str | None = None) -> dict:
    """Drive a running server at `url` (process `server_pid`) from `clients` client processes
    (the streams split among them) and return the figures. With `perf_out`, `perf record` samples
    the proxy's CPU (user and kernel, call graphs) over the window into that file."""
    procs = [subprocess.Popen([PY, "-c", CLIENT.replace("sk-test-premium", key), url, str(streams // clients),
                               str(duration + 2), str(tokens), model, str(temperature)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(clients)]
    time.sleep(2)  # warm-up: every stream running before the window opens
    workers = children(server_pid)  # the pool's worker processes (none when --url names a remote server)
    perf = None
    if perf_out:
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-o", perf_out,
                                 "-p", str(server_pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (user0, system0), t0 = cpu_times(server_pid), time.monotonic()
        workers0 = sum(cpu_seconds(w) for w in workers)
        outs = [json.loads(p.communicate(timeout=duration + 120)[0]) for p in procs]
        (user1, system1), t1 = cpu_times(server_pid), time.monotonic()
        workers1 = sum(cpu_seconds(w) for w in workers)
    finally:
        if perf is not None:  # stopped however the window ends (it would follow a running server on)
            perf.send_signal(signal.SIGINT)  # perf writes its file and exits
            perf.wait(60)
    cpu0, cpu1 = user0 + system0, user1 + system1
    done = {k: sum(o[k] for o in outs) for k in ("tokens", "streams", "errors", "window_tokens")}
    ttft = sorted(v for o in outs for v in o["ttft"])
    itl = sorted(v for o in outs for v in o["itl"])

    def pct(values, p):
        return round(values[min(len(values) - 1, int(len(values) * p / 100))] * 1000, 2) if values else None
    window = t1 - t0
    # Tokens inside the clients' run: each stream's tokens apportioned over its first chunk to its
    # end. Counting only the streams that ended inside the run (completed_tok_s, the figure of
    # earlier sections) moves in steps of one stream's tokens - at 256 streams that began together
    # and stay in step, a step is 256 x tokens / run (~2,340 tok/s for 128 tokens over 14 s).
    tok_s = done["window_tokens"] / (duration + 2)
    completed_tok_s = done["tokens"] / (duration + 2)
    return {"streams": streams, "clients": clients, "tokens_per_stream": tokens, "temperature": temperature,
            "window_s": round(window, 2),
            "delivered_tok_s": round(tok_s), "completed_tok_s": round(completed_tok_s),
            "streams_done": done["streams"], "errors": done["errors"],
            "proxy_cpu_s": round(cpu1 - cpu0, 2), "proxy_core_share": round((cpu1 - cpu0) / window, 3),
            # the kernel's part of it (system calls: receives, sends, polling)
            "proxy_system_fraction": round((system1 - system0) / (cpu1 - cpu0), 3) if cpu1 > cpu0 else None,
            # None where nothing was delivered (a worker that failed every stream)
            "proxy_cpu_us_per_token": round((cpu1 - cpu0) / (tok_s * window) * 1e6, 2) if tok_s else None,
            "workers_cpu_us_per_token": round((workers1 - workers0) / (tok_s * window) * 1e6, 2) if tok_s and workers else None,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def run(streams: int, duration: float, token_ms: float, tokens: int, stream_interval: int = 1,
        perf_out: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-bench-stream-"))
    config, port, _ = fake_bench_config(tmp, devices=["cpu"], replicas={"hot": 1}, max_batch_size=streams,
                                        max_inflight_per_worker=streams, stream_interval=stream_interval,
                                        fake={"token_latency_ms": token_ms, "output_tokens": tokens})
    config["cache"] = {"enabled": False}
    for tier in config["tiers"]:
        tier.update(max_concurrent=streams, max_queue=streams)
    server = start_server(config, tmp / "c.yaml", port)
    try:
        return {"token_ms": token_ms, "stream_interval": stream_interval, **measure(f"http://127.0.0.1:{port}", server.pid, streams, duration, tokens, perf_out=perf_out)}
    finally:
        server.terminate()
        server.wait(60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--token-ms", type=float, default=5.0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the pool's stream_interval: tokens per event after the first (started server only)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--url", help="measure this running server instead of starting one (with --pid)")
    p.add_argument("--pid", type=int, help="the running server's process id")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--key", default="sk-test-premium")
    p.add_argument("--clients", type=int, default=1, help="client processes the streams are split among")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="the requests' sampling temperature (0: greedy, as the engine-alone runs of bench_gpu)")
    p.add_argument("--perf", metavar="FILE", help="also sample the proxy with `perf record` over the window into "
                   "FILE (read it with `perf report -i FILE --no-children --sort dso,symbol -g none`)")
    args = p.parse_args(argv)
    if args.perf and not shutil.which("perf"):
        p.error("--perf needs perf (Debian: linux-perf)")
    if args.url:
        result = measure(args.url, args.pid, args.streams, args.duration, args.tokens, args.model, args.key,
                         args.clients, args.temperature, args.perf)
    else:
        result = run(args.streams, args.duration, args.token_ms, args.tokens, args.stream_interval, args.perf)
    result["machine"] = f"{os.cpu_count()} cores, {sys.platform}"
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
