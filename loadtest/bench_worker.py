"""The worker process's own ceiling: a real worker (`python -m backend`) with the fake engine at
no per-token latency, driven over its Unix socket by a closed loop of `--streams` generations
from this process (no proxy). Every step of the fake engine is host work - the scheduler, the
frames, the socket - so the delivered tokens per second and the worker's CPU per token measure
the worker's host path, which bounded the served throughput on the H200.

    python -m loadtest.bench_worker [--streams 256] [--tokens 128] [--duration 10]

With --latency N: instead, N requests one at a time (a pause of 1 ms between them), and the
percentiles of the time from writing a Generate to its first frame and to its Finished - the
worker's share of a request's latency through the proxy.

    python -m loadtest.bench_worker --latency 500 --tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from backend import protocol
from backend.protocol import Finished, Generate, Ready, SamplingParams, TokenBatch, Tokens, WorkerSettings
from loadtest.bench_stream import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent


async def drive(path: Path, pid: int, streams: int, tokens: int, duration: float) -> dict:
    reader, writer = await asyncio.open_unix_connection(str(path))
    decoder = protocol.proxy_decoder()
    ready = False
    while not ready:
        for msg in decoder.feed(await reader.read(1 << 16)):
            ready = ready or isinstance(msg, Ready)
    next_id = 0

    def generate() -> bytes:
        nonlocal next_id
        next_id += 1
        return protocol.encode(Generate(id=next_id, prompt=f"stream {next_id}",
                                        params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))

    writer.write(b"".join(generate() for _ in range(streams)))
    produced = 0
    started = time.perf_counter()
    cpu0 = cpu_seconds(pid)
    while time.perf_counter() - started < duration:
        data = await reader.read(1 << 18)
        if not data:
            raise RuntimeError("the worker closed the connection")
        again = []
        for msg in decoder.feed(data):
            if isinstance(msg, TokenBatch):
                produced += sum(map(len, msg.token_ids))
            elif isinstance(msg, Tokens):
                produced += len(msg.token_ids)
            elif isinstance(msg, Finished):
                again.append(generate())
        if again:
            writer.write(b"".join(again))
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    writer.close()
    return {"streams": streams, "tokens_per_stream": tokens, "window_s": round(wall, 2),
            "tokens_per_s": round(produced / wall), "worker_core_share": round(cpu / wall, 3),
            "worker_cpu_us_per_token": round(cpu / produced * 1e6, 2)}


async def latency(path: Path, requests: int, tokens: int) -> dict:
    reader, writer = await asyncio.open_unix_connection(str(path))
    decoder = protocol.proxy_decoder()

    async def messages() -> list:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                raise RuntimeError("the worker closed the connection")
            found = decoder.feed(data)
            if found:
                return found

    while not any(isinstance(m, Ready) for m in await messages()):
        pass
    first, whole = [], []
    for i in range(requests + requests // 5):  # the first fifth warms up and is not counted
        started = time.perf_counter()
        writer.write(protocol.encode(Generate(id=i + 1, prompt="benchmark prompt",
                                              params=SamplingParams(max_tokens=tokens, temperature=0.5))))
        first_at = None
        done = False
        while not done:
            for msg in await messages():
                first_at = first_at or time.perf_counter()
                done = done or isinstance(msg, Finished)
        if i >= requests // 5:
            first.append(first_at - started)
            whole.append(time.perf_counter() - started)
        await asyncio.sleep(0.001)
    writer.close()

    def ms(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

    return {"requests": requests, "tokens": tokens, "first_frame_p50_ms": ms(first, 0.5),
            "first_frame_p99_ms": ms(first, 0.99), "finished_p50_ms": ms(whole, 0.5), "finished_p99_ms": ms(whole, 0.99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_worker", description=__doc__)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--latency", type=int, metavar="N", help="N requests one at a time: latency percentiles")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-bench-worker-"))
    path = tmp / "w.sock"
    settings = WorkerSettings(engine="fake", model_name="fake", max_batch_size=args.streams, fake_token_latency_ms=0,
                              fake_output_tokens=args.tokens + 1, heartbeat_interval_s=1.0)
    worker = subprocess.Popen([sys.executable, "-m", "backend", "--listen", str(path), "--settings",
                               msgspec.json.encode(settings).decode()], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not start")
            time.sleep(0.05)
        if args.latency:
            print(json.dumps(asyncio.run(latency(path, args.latency, args.tokens))))
        else:
            print(json.dumps(asyncio.run(drive(path, worker.pid, args.streams, args.tokens, args.duration))))
    finally:
        worker.terminate()
        worker.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
