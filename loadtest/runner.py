"""Runs a workload against a server: open loop (Poisson arrivals, so latency cannot hide behind a
slow client) or closed loop (fixed concurrency); optional chaos (a random worker killed through
the admin API every N seconds). Bounded in time and count; loopback only."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from loadtest.workload import RequestFactory, Workload


@dataclass
class Result:
    tier: str
    stream: bool
    start: float  # seconds since the run began
    status: int  # HTTP status; 0 = connection failure; 599 = error event inside a stream
    total_s: float
    ttft_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    cache: str | None = None


@dataclass
class Run:
    workload: Workload
    results: list[Result] = field(default_factory=list)
    chaos_events: list[tuple[float, str]] = field(default_factory=list)
    wall_s: float = 0.0


async def _one(session: aiohttp.ClientSession, w: Workload, tier: str, key: str, body: dict, t0: float) -> Result:
    start = time.perf_counter()
    res = Result(tier, body["stream"], start - t0, 0, 0.0)
    try:
        async with session.post(w.url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"},
                                timeout=aiohttp.ClientTimeout(total=w.timeout_s)) as resp:
            res.status = resp.status
            res.cache = resp.headers.get("X-Fullpower-Cache")
            if resp.status != 200 or not body["stream"]:
                payload = await resp.read()
                if resp.status == 200:
                    res.ttft_s = time.perf_counter() - start
                    try:
                        import json
                        res.completion_tokens = json.loads(payload)["usage"]["completion_tokens"]
                    except (ValueError, KeyError, TypeError):
                        pass
            else:
                last = None
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        break
                    if b'"error"' in line[:12]:
                        res.status = 599
                        break
                    if b'"content":"' in line or b'"text":"' in line:
                        if res.ttft_s is None:
                            res.ttft_s = now - start
                        elif last is not None:
                            res.inter_token_s.append(now - last)
                        last = now
                        res.completion_tokens += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        res.status = res.status if res.status not in (0, 200) else 0
    res.total_s = time.perf_counter() - start
    return res


async def _chaos(session: aiohttp.ClientSession, w: Workload, t0: float, run: Run, rng: random.Random) -> None:
    while True:
        await asyncio.sleep(w.chaos_every_s)
        try:
            auth = {"Authorization": f"Bearer {w.admin_token}"}
            async with session.get(w.admin_url + "/admin/pool", headers=auth) as resp:
                workers = [x for x in (await resp.json())["workers"] if x["state"] == "ready"]
            if not workers:
                continue
            victim = rng.choice(workers)["id"]
            async with session.post(f"{w.admin_url}/admin/workers/{victim}/kill", headers=auth) as resp:
                if resp.status == 200:
                    run.chaos_events.append((time.perf_counter() - t0, victim))
        except (aiohttp.ClientError, OSError, KeyError, ValueError):
            pass


async def _progress(run: Run, t0: float, w: Workload) -> None:
    while True:
        await asyncio.sleep(1.0)
        done = run.results
        ok = sum(1 for r in done if r.status == 200)
        shed = sum(1 for r in done if r.status in (429, 503))
        elapsed = time.perf_counter() - t0
        print(f"\r[{elapsed:5.1f}s/{w.duration_s:.0f}s] {len(done)} done, {ok} ok, {shed} shed, "
              f"{len(done) / max(elapsed, 1e-9):.0f} req/s, {len(run.chaos_events)} kills   ",
              end="", file=sys.stderr, flush=True)


async def run_workload(w: Workload, progress: bool = True) -> Run:
    run = Run(w)
    factory = RequestFactory(w)
    rng = random.Random(w.seed + 1)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        deadline = t0 + w.duration_s
        side = []
        if w.chaos_every_s:
            side.append(asyncio.create_task(_chaos(session, w, t0, run, rng)))
        if progress:
            side.append(asyncio.create_task(_progress(run, t0, w)))
        pending: set[asyncio.Task] = set()

        def launch() -> None:
            tier, key, body = factory.next()
            task = asyncio.create_task(_one(session, w, tier, key, body, t0))
            pending.add(task)
            task.add_done_callback(lambda t: (pending.discard(t), run.results.append(t.result())))

        if w.mode == "open":
            next_at = t0
            while factory.n < w.max_requests:
                next_at += rng.expovariate(w.rate)
                if next_at >= deadline:
                    break
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                launch()
        else:
            async def client() -> None:
                while time.perf_counter() < deadline and factory.n < w.max_requests:
                    tier, key, body = factory.next()
                    run.results.append(await _one(session, w, tier, key, body, t0))
            await asyncio.gather(*(client() for _ in range(w.concurrency)))
        if pending:
            await asyncio.wait(pending, timeout=w.timeout_s)
        for task in side:
            task.cancel()
        run.wall_s = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    return run
