"""Hardening, through real `fullpower serve` processes: no single client can stall the appliance,
reach what it should not, or see another tenant's work. Each test names the finding it covers."""

import asyncio
import collections
import json
import socket
import time

import aiohttp

from tests.conftest import fake_config, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body


async def _post(session, url, tier, payload, **kw):
    async with session.post(url + "/v1/chat/completions", json=payload,
                            headers={"Authorization": KEYS[tier]}, **kw) as resp:
        return resp.status, await resp.read()


def test_burst_sheds_the_lowest_tier_first(start_server):
    """Finding 10: under a burst every tier's own queue overflowed alike; premium must see no
    refusal while batch work is queued."""
    server = start_server(fake_config(fake={"token_latency_ms": 20, "output_tokens": 16}))

    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            jobs = [(tier, _post(s, server.url, tier, body(f"{tier} {i}", temperature=0.7)))
                    for i in range(400) for tier in ("premium", "standard", "batch")]
            statuses = await asyncio.gather(*(job for _, job in jobs))
        return collections.Counter((tier, status) for (tier, _), (status, _) in zip(jobs, statuses))

    counts = asyncio.run(run())
    assert counts[("premium", 200)] == 400, counts
    refused = {tier: counts[(tier, 429)] for tier in ("premium", "standard", "batch")}
    assert refused["batch"] > 0 and refused["batch"] >= refused["standard"], counts
    assert sum(refused.values()) + sum(counts[(t, 200)] for t in refused) == 1200, counts
