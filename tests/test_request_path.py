"""The request path under load and failure, through real `fullpower serve` processes with fake
workers: tier priority, overload shedding, cancellation, failover, rate limits."""

import asyncio
import json
import os
import signal
import urllib.request

import aiohttp
import pytest

from tests.conftest import fake_config, http_json, metric_value, wait_until

KEYS = {t: f"Bearer sk-test-{t}" for t in ("premium", "standard", "batch")}


def body(prompt="hello", **extra):
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}], **extra}


async def post(session, url, tier, payload, **kw):
    async with session.post(url + "/v1/chat/completions", json=payload,
                            headers={"Authorization": KEYS[tier]}, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def test_saturated_tiers_are_served_by_weight(start_server):
    config = fake_config(max_inflight_per_worker=1, max_batch_size=1,
                         fake={"token_latency_ms": 15, "output_tokens": 4})
    for tier in config["tiers"]:
        tier.update(max_queue=100, queue_timeout_s=60)
    server = start_server(config)
    order = []

    async def run():
        async with aiohttp.ClientSession() as s:
            async def one(tier, i):
                status, _, _ = await post(s, server.url, tier, body(f"{tier} {i}"))
                assert status == 200
                order.append(tier)
            await asyncio.gather(*(one(t, i) for i in range(30) for t in ("batch", "standard", "premium")))
    asyncio.run(run())
    assert len(order) == 90
    first = order[2:42]  # after the two that found free workers, while all three tiers wait
    counts = {t: first.count(t) for t in ("premium", "standard", "batch")}
    assert counts["premium"] > counts["standard"] > counts["batch"] >= 1, counts
    assert 20 <= counts["premium"] <= 28 and 8 <= counts["standard"] <= 16, counts


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_overload_is_shed_with_retry_after_and_no_worker_blamed(start_server):
    config = fake_config(max_inflight_per_worker=2, fake={"token_latency_ms": 20, "output_tokens": 10})
    for tier in config["tiers"]:
        tier.update(max_queue=2, queue_timeout_s=30)
    server = start_server(config)

    async def wave():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(post(s, server.url, "standard", body(f"q{i}")) for i in range(18)))

    rss = []
    for _ in range(4):
        results = asyncio.run(wave())
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 429}, statuses
        # capacity 4 running + 2 queued; 3x that is offered, the rest is shed
        assert statuses.count(200) >= 6 and statuses.count(429) >= 6, statuses
        for status, headers, raw in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
                assert json.loads(raw)["error"]["type"] == "rate_limit_error"
            else:
                assert json.loads(raw)["choices"][0]["message"]["content"]
        rss.append(rss_kib(server.proc.pid))
    assert all(w["state"] == "ready" and w["restarts"] == 0 and w["boot_failures"] == 0 for w in server.pool())
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_requests_total", outcome="shed", status="429") >= 24
    assert rss[-1] - rss[1] < 20 * 1024, rss  # flat after the first wave warmed things up


def test_no_ready_worker_is_503_with_retry_after(start_server):
    server = start_server(fake_config(fake={"boot_fail": "broken on purpose"}), wait_ready=False)
    wait_until(lambda: _reachable(server), what="admin listener")
    status, headers, payload = http_json(server.url + "/v1/chat/completions", body(),
                                         {"Authorization": KEYS["premium"]})
    assert status == 503 and headers["Retry-After"] and payload["error"]["code"] == "no_worker_ready"


def _reachable(server):
    try:
        return server.pool()
    except OSError:
        return None


def _idle(server):
    workers = server.pool()
    return all(w["inflight"] == 0 and w["engine_running"] == 0 for w in workers) and workers


def test_client_disconnect_mid_stream_cancels_generation(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 50, "output_tokens": 2000}))

    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/v1/chat/completions", json=body(stream=True, max_tokens=2000),
                              headers={"Authorization": KEYS["premium"]}) as resp:
                for _ in range(3):
                    await resp.content.readuntil(b"\n\n")
                await asyncio.to_thread(wait_until, lambda: any(w["engine_running"] == 1 for w in server.pool()),
                                        what="the worker decoding the stream")
    asyncio.run(run())
    wait_until(lambda: _idle(server), what="worker idle after disconnect")
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_cancellations_total", stage="generating") == 1
    assert metric_value(metrics, "fullpower_requests_total", outcome="cancelled") == 1


def test_client_disconnect_mid_queue_frees_the_slot(start_server):
    config = fake_config(max_inflight_per_worker=1, max_batch_size=1,
                         fake={"token_latency_ms": 20, "output_tokens": 2000})
    server = start_server(config)

    async def run():
        async with aiohttp.ClientSession() as s:
            holders = [asyncio.create_task(post(s, server.url, "premium", body(f"hold {i}", max_tokens=200)))
                       for i in range(2)]
            await asyncio.sleep(0.5)
            with pytest.raises(asyncio.TimeoutError):
                await post(s, server.url, "batch", body("queued"), timeout=aiohttp.ClientTimeout(total=0.5))
            await asyncio.to_thread(wait_until, lambda: http_json(server.admin + "/admin/pool")[2]["queues"]["main"]
                                    ["batch"]["queued"] == 0, what="queue empty after the client left")
            for h in holders:
                h.cancel()
    asyncio.run(run())
    wait_until(lambda: _idle(server), what="workers idle")
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_cancellations_total", stage="queued") == 1
    # the freed capacity serves again
    assert http_json(server.url + "/v1/chat/completions", body(max_tokens=3), {"Authorization": KEYS["batch"]})[0] == 200


def test_worker_error_before_first_byte_is_retried_elsewhere(start_server):
    server = start_server(fake_config(fake={"fail_every": 2, "token_latency_ms": 0}))
    for i in range(12):
        status, headers, payload = http_json(server.url + "/v1/chat/completions", body(f"r{i}", max_tokens=3),
                                             {"Authorization": KEYS["standard"]})
        assert status == 200, payload
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_retries_total", reason="worker_error") >= 1


NO_CACHE = {"Cache-Control": "no-cache, no-store"}  # every request reaches a worker


def read_stream(url, payload, key, on_event=None, headers=None):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": key, **(headers or {})})
    events, n = [], 0
    with urllib.request.urlopen(req, timeout=60) as resp:
        buf = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                if block.startswith(b"data: "):
                    events.append(block[6:].decode())
                    n += 1
                    if on_event:
                        on_event(n)
    return events


def stream_text(events):
    text = ""
    for e in events:
        if e == "[DONE]":
            continue
        obj = json.loads(e)
        if "error" in obj:
            continue
        for c in obj["choices"]:
            text += c["delta"].get("content") or ""
    return text


def test_stream_survives_worker_crash_token_exact(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 30, "output_tokens": 40}))
    payload = body("resume this", stream=True, temperature=0)
    reference = stream_text(read_stream(server.url, payload, KEYS["premium"], headers=NO_CACHE))

    killed = []

    def kill_serving_worker(n):
        if n == 10 and not killed:
            busy = [w for w in server.pool() if w["inflight"]]
            os.kill(busy[0]["pid"], signal.SIGKILL)
            killed.append(busy[0]["id"])

    events = read_stream(server.url, payload, KEYS["premium"], kill_serving_worker, headers=NO_CACHE)
    assert killed and events[-1] == "[DONE]"
    assert not any("error" in json.loads(e) for e in events[:-1])
    assert stream_text(events) == reference
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_stream_resumes_total") == 1
    wait_until(lambda: all(w["state"] == "ready" for w in server.pool()) and
               any(w["restarts"] == 1 for w in server.pool()), what="replacement ready")


def test_stream_gets_error_event_when_no_worker_can_take_over(start_server):
    config = fake_config(devices=["cpu"], replicas={"hot": 1}, fake={"token_latency_ms": 30, "output_tokens": 40})
    server = start_server(config)

    def kill(n):
        if n == 5:
            os.kill(server.pool()[0]["pid"], signal.SIGKILL)

    events = read_stream(server.url, body("x", stream=True), KEYS["premium"], kill)
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["error"]["type"] == "server_error"


def test_key_rate_limit_and_priority_header(start_server):
    config = fake_config(fake={"token_latency_ms": 0})
    config["auth"]["keys"][2]["requests_per_second"] = 1
    server = start_server(config)
    statuses = []
    for _ in range(3):
        status, headers, payload = http_json(server.url + "/v1/chat/completions", body(max_tokens=2),
                                             {"Authorization": KEYS["batch"]})
        statuses.append(status)
    assert statuses[0] == 200 and 429 in statuses
    assert payload["error"]["code"] == "rate_limit_exceeded" and int(headers["Retry-After"]) >= 1
    # X-Priority lowers (premium -> batch is allowed), never raises (batch -> premium is ignored)
    assert http_json(server.url + "/v1/chat/completions", body(max_tokens=2),
                     {"Authorization": KEYS["premium"], "X-Priority": "batch"})[0] == 200
    assert http_json(server.url + "/v1/chat/completions", body(max_tokens=2),
                     {"Authorization": KEYS["premium"], "X-Priority": "gold"})[0] == 400
    log = server.log()
    lines = [json.loads(l.split("fullpower.access: ", 1)[1]) for l in log.splitlines() if "fullpower.access: " in l]
    lowered = [l for l in lines if l["key"] == "test-premium" and l["tier"] == "batch"]
    assert lowered and "sk-test" not in log


def test_sse_keepalive_comment_when_idle(start_server):
    config = fake_config(fake={"token_latency_ms": 700, "output_tokens": 3})
    config["timeouts"] = {"keepalive_comment_s": 0.2}
    server = start_server(config)
    req = urllib.request.Request(server.url + "/v1/chat/completions",
                                 data=json.dumps(body(stream=True)).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": KEYS["premium"]})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read().decode()
    assert ": keep-alive\n\n" in raw and raw.endswith("data: [DONE]\n\n")


def test_idle_timeout_ends_a_stalled_stream_with_an_error_event(start_server):
    config = fake_config(fake={"token_latency_ms": 3000, "output_tokens": 3})
    config["timeouts"] = {"idle_s": 1, "first_token_s": 10, "keepalive_comment_s": 0.3}
    server = start_server(config)
    events = read_stream(server.url, body(stream=True), KEYS["premium"])
    assert json.loads(events[-1])["error"]["code"] == "timeout"
