"""The worker process's own ceiling: a real worker (`python -m backend`) with the fake engine at
no per-token latency, driven over its Unix socket by a closed loop of `--streams` generations
from this process (no proxy). Every step of the fake engine is host work - the scheduler, the
frames, the socket - so the delivered tokens per second and the worker's CPU per token measure
the worker's host path, which bounded the served throughput on the H200.

    python -m loadtest.bench_worker [--streams 256] [--tokens 128] [--duration 10]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_worker", description=__doc__)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=10.0)
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
        print(json.dumps(asyncio.run(drive(path, worker.pid, args.streams, args.tokens, args.duration))))
    finally:
        worker.terminate()
        worker.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
