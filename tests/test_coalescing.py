"""Coalescing, the cache and degradation through real `fullpower serve` processes."""

import asyncio
import json
import time

import aiohttp

from tests.conftest import ROOT, fake_config, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body


async def fetch(session, url, payload, key=KEYS["standard"], headers=None):
    """(status, X-Fullpower-Cache, content text) for a streaming or non-streaming request."""
    async with session.post(url + "/v1/chat/completions", json=payload,
                            headers={"Authorization": key, **(headers or {})}) as resp:
        raw = await resp.read()
        cache = resp.headers.get("X-Fullpower-Cache")
        if resp.status != 200:
            return resp.status, cache, raw.decode()
        if not payload.get("stream"):
            return 200, cache, json.loads(raw)["choices"][0]["message"]["content"]
        text, error = "", None
        for block in raw.decode().split("\n\n"):
            if block.startswith("data: {"):
                obj = json.loads(block[6:])
                if "error" in obj:
                    error = obj["error"]
                for c in obj.get("choices", []):
                    text += c["delta"].get("content") or ""
        return (599 if error else 200), cache, text


def generated(server):
    return sum(w["engine_running"] for w in server.pool())


def worker_tokens(server):
    text = http_json(server.admin + "/metrics")[2]
    return metric_value(text, "fullpower_worker_generated_tokens_total")


def heartbeats_since(server, since):
    """Every worker has sent a heartbeat after `since` (time.monotonic(): the same clock as the
    proxy's), so the token counts it reports include everything generated before then."""
    age = time.monotonic() - since
    return all(w["heartbeat_age_s"] is not None and w["heartbeat_age_s"] < age for w in server.pool())


def test_hundred_identical_requests_one_generation_then_a_hit(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 25, "output_tokens": 16}))
    ready = time.monotonic()  # the warm-up ran before Ready: count from the next heartbeats on
    wait_until(lambda: heartbeats_since(server, ready), what="heartbeats after ready")
    before = worker_tokens(server)
    payload = body("coalesce me", temperature=0)

    async def run():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(fetch(s, server.url, {**payload, "stream": i % 2 == 0})
                                          for i in range(100)))
    results = asyncio.run(run())
    assert all(status == 200 for status, _, _ in results)
    caches = [c for _, c, _ in results]
    assert caches.count("miss") == 1 and caches.count("coalesced") == 99
    assert len({text for _, _, text in results}) == 1
    done = time.monotonic()
    wait_until(lambda: heartbeats_since(server, done), what="heartbeats after the answers")
    assert worker_tokens(server) - before == 17  # one generation: 16 tokens + EOS

    async def again():
        async with aiohttp.ClientSession() as s:
            return [await fetch(s, server.url, {**payload, "stream": st}) for st in (False, True)]
    for status, cache, text in asyncio.run(again()):
        assert status == 200 and cache == "hit" and text == results[0][2]
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_cache_requests_total", result="hit") == 2
    assert metric_value(metrics, "fullpower_cache_requests_total", result="coalesced") == 99


def _running(server):
    return sum(w["engine_running"] for w in server.pool())


def _metric(server, name, **labels):
    return metric_value(http_json(server.admin + "/metrics")[2], name, **labels)


def _queued(server, tier):
    return sum(queues[tier]["queued"] for queues in http_json(server.admin + "/admin/pool")[2]["queues"].values())


def test_disconnects_of_followers_and_leader(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 40, "output_tokens": 60}))
    payload = body("shared", temperature=0, stream=True)

    async def run():
        async with aiohttp.ClientSession() as s:
            leader = asyncio.create_task(fetch(s, server.url, payload))
            await asyncio.to_thread(wait_until, lambda: _running(server) == 1, what="leader generating")
            follower_a = asyncio.create_task(fetch(s, server.url, payload))
            follower_b = asyncio.create_task(fetch(s, server.url, payload))
            await asyncio.to_thread(wait_until, lambda: _metric(server, "fullpower_cache_requests_total",
                                                                result="coalesced") == 2, what="followers joined")
            follower_a.cancel()  # a follower leaves: the generation goes on
            await asyncio.to_thread(wait_until, lambda: _metric(server, "fullpower_requests_total", status="499") == 1,
                                    what="follower gone")
            pool = await asyncio.to_thread(server.pool)
            assert sum(w["inflight"] for w in pool) == 1  # still generating, once
            leader.cancel()  # the leader leaves: it goes on for follower_b
            status, cache, text = await follower_b
            assert status == 200 and cache == "coalesced" and len(text.split()) == 60
            # the last waiter leaving cancels the generation
            solo = asyncio.create_task(fetch(s, server.url, body("alone", temperature=0, stream=True)))
            await asyncio.to_thread(wait_until, lambda: _running(server) == 1, what="solo generating")
            solo.cancel()
            await asyncio.to_thread(wait_until, lambda: _running(server) == 0 and
                                    all(w["inflight"] == 0 for w in server.pool()), what="generation cancelled")
    asyncio.run(run())


def test_worker_error_reaches_every_waiter(start_server):
    server = start_server(fake_config(fake={"fail_every": 1, "prompt_latency_ms": 200}))

    async def run():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(fetch(s, server.url, body("doomed", temperature=0, stream=i % 2 == 0))
                                          for i in range(10)))
    results = asyncio.run(run())
    assert [r[0] for r in results] == [502] * 10
    caches = [r[1] for r in results]
    assert caches.count("miss") == 1 and caches.count("coalesced") == 9  # one generation, its error for all
    assert all("upstream_error" in r[2] for r in results)


def test_sampled_requests_and_differing_parameters_never_share(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 20}))

    async def run():
        async with aiohttp.ClientSession() as s:
            sampled = await asyncio.gather(*(fetch(s, server.url, body("sample", temperature=0.7)) for _ in range(3)))
            variants = await asyncio.gather(*(fetch(s, server.url, body("same", **{"temperature": 0, **extra})) for extra in (
                {}, {"max_tokens": 7}, {"stop": ["zz"]}, {"top_p": 0.5, "temperature": 0.5, "seed": 1},
                {"seed": 2, "temperature": 0.5})))
            again = await fetch(s, server.url, body("sample", temperature=0.7))
            return sampled, variants, again
    sampled, variants, again = asyncio.run(run())
    assert [c for _, c, _ in sampled] == ["bypass"] * 3 and again[1] == "bypass"
    assert [c for _, c, _ in variants] == ["miss"] * 5


def test_cache_control_headers(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 0}))

    async def run():
        async with aiohttp.ClientSession() as s:
            p = body("cc", temperature=0)
            first = await fetch(s, server.url, p, headers={"Cache-Control": "no-store"})
            second = await fetch(s, server.url, p)  # nothing was stored
            third = await fetch(s, server.url, p, headers={"Cache-Control": "no-cache"})  # skips reading
            fourth = await fetch(s, server.url, p)
            return first, second, third, fourth
    first, second, third, fourth = asyncio.run(run())
    assert (first[1], second[1], third[1], fourth[1]) == ("miss", "miss", "miss", "hit")


def test_disk_tier_survives_a_restart_and_clear_empties_it(start_server, tmp_path):
    config = fake_config(fake={"token_latency_ms": 0})
    config["data_dir"] = str(tmp_path / "data")
    payload = body("persist me", temperature=0)
    first = start_server(config)
    status, headers, answer = http_json(first.url + "/v1/chat/completions", payload, {"Authorization": KEYS["batch"]})
    assert headers["X-Fullpower-Cache"] == "miss"
    first.stop()  # a stop waits for pending cache writes
    second = start_server(config)
    status, headers, again = http_json(second.url + "/v1/chat/completions", payload, {"Authorization": KEYS["batch"]})
    assert headers["X-Fullpower-Cache"] == "hit" and again["choices"] == answer["choices"]
    import subprocess
    from tests.conftest import FULLPOWER
    result = subprocess.run(FULLPOWER + ["cache", "clear", "--admin", f"127.0.0.1:{second.admin_port}",
                                         "--admin-token-file", second.config["admin_token_file"]], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "cleared" in result.stdout
    status, headers, _ = http_json(second.url + "/v1/chat/completions", payload, {"Authorization": KEYS["batch"]})
    assert headers["X-Fullpower-Cache"] == "miss"


def test_unwritable_disk_degrades_to_memory(start_server, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    config = fake_config(fake={"token_latency_ms": 0})
    config["cache"] = {"disk_dir": str(blocker / "cache")}
    server = start_server(config)
    payload = body("memory only", temperature=0)
    statuses = [http_json(server.url + "/v1/chat/completions", payload, {"Authorization": KEYS["batch"]})
                for _ in range(2)]
    assert [s[0] for s in statuses] == [200, 200]
    assert [s[1]["X-Fullpower-Cache"] for s in statuses] == ["miss", "hit"]
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_cache_disk_errors_total") >= 1
    assert "disk cache unavailable" in server.log()


def test_degradation_moves_lower_tiers_and_returns(start_server):
    config = fake_config(devices=["cpu"], replicas={"hot": 1}, max_inflight_per_worker=1, max_batch_size=1,
                         fake={"token_latency_ms": 30, "output_tokens": 10})
    small = {"name": "small", "model": "small-model", "engine": "fake", "devices": ["cpu"],
             "fake": {"token_latency_ms": 0}}
    config["pools"].append(small)
    for tier in config["tiers"]:
        tier.update(max_queue=50, queue_timeout_s=60)
        if tier["name"] != "premium":
            tier["fallback"] = {"pool": "small", "queue_depth": 2}
    config["cache"] = {"enabled": False}
    server = start_server(config)

    async def run():
        async with aiohttp.ClientSession() as s:
            async def served_by(tier, prompt):
                async with s.post(server.url + "/v1/chat/completions", json=body(prompt),
                                  headers={"Authorization": KEYS[tier]}) as resp:
                    await resp.read()
                    return resp.status, resp.headers["X-Fullpower-Model"]
            assert await served_by("standard", "calm") == (200, "fake-model")
            flood = [asyncio.create_task(served_by("premium", f"p{i}")) for i in range(6)]
            await asyncio.to_thread(wait_until, lambda: _queued(server, "premium") >= 2, interval=0.02,
                                    what="premium queued")
            degraded = [await served_by(t, f"{t} under load") for t in ("standard", "batch")]
            premium = await asyncio.gather(*flood)
            back = await served_by("standard", "calm again")
            return degraded, premium, back
    degraded, premium, back = asyncio.run(run())
    assert degraded == [(200, "small-model"), (200, "small-model")]
    assert all(p == (200, "fake-model") for p in premium)
    assert back == (200, "fake-model")
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_degraded_requests_total", pool="small") == 2


def test_coalescing_on_the_tiny_real_model(start_server, tiny_model):
    config = {
        "pools": [{"name": "main", "model": "tiny", "model_path": str(tiny_model), "devices": ["cpu"],
                   "max_batch_size": 4}],
        "tiers": [{"name": "standard", "pool": "main"}],
        "auth": {"allow_anonymous": True, "anonymous_tier": "standard"},
    }
    server = start_server(config)
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40,
               "temperature": 0, "ignore": "extra fields are fine"}

    async def run():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(fetch(s, server.url, {**payload, "stream": i % 2 == 1}, key="Bearer x")
                                          for i in range(8)))
    results = asyncio.run(run())
    assert all(r[0] == 200 for r in results)
    assert sorted(r[1] for r in results) == ["coalesced"] * 7 + ["miss"]
    assert len({r[2] for r in results}) == 1
