"""Talk to one worker process directly over the worker protocol (no proxy): the baseline for the
streaming benchmark. Spawns `python -m backend` like the supervisor does."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

import msgspec

from backend import protocol
from backend.protocol import ChatMessage, Finished, Generate, Ready, SamplingParams, TokenBatch, Tokens, WorkerSettings


async def stream_tokens_per_s(settings: WorkerSettings, max_tokens: int, rounds: int = 3) -> float:
    tmp = tempfile.mkdtemp(prefix="fp-worker-")
    path = os.path.join(tmp, "worker.sock")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "--listen", path, "--settings",
                             msgspec.json.encode(settings).decode()])
    while True:  # the worker binds its socket at once, before loading anything
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            await asyncio.sleep(0.02)
    decoder = protocol.proxy_decoder()

    async def next_messages():
        while True:
            msgs = decoder.feed(await reader.read(1 << 16))
            if msgs:
                return msgs

    try:
        while not any(isinstance(m, Ready) for m in await next_messages()):
            pass
        best = 0.0
        for r in range(rounds):
            writer.write(protocol.encode(Generate(id=r + 1, params=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                   ignore_eos=True),
                                                  messages=[ChatMessage("user", "go")])))
            started, tokens = time.perf_counter(), 0
            done = False
            while not done:
                for m in await next_messages():
                    if isinstance(m, TokenBatch):
                        tokens += sum(map(len, m.token_ids))
                    elif isinstance(m, Tokens):
                        tokens += len(m.token_ids)
                    elif isinstance(m, Finished):
                        done = True
            best = max(best, tokens / (time.perf_counter() - started))
        return best
    finally:
        proc.terminate()
        proc.wait(10)
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
