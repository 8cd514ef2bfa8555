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


def _stalled_stream(port: int, key: str) -> socket.socket:
    """A streaming request from a client that never reads its answer (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body("never read", stream=True, temperature=0.7, max_tokens=90000)).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: {key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_clients_that_stop_reading_lose_their_slots(start_server):
    """Finding 2: four non-reading streams filled a pool of capacity 4 for as long as their sockets
    stayed open; premium got 429."""
    # 90,000 tokens of SSE (about 13 MB) do not fit in the sockets' buffers
    config = fake_config(max_inflight_per_worker=2,
                         fake={"token_latency_ms": 0, "output_tokens": 100000, "context_length": 100000})
    config["timeouts"] = {"stream_write_s": 1.0}
    for tier in config["tiers"]:
        tier["queue_timeout_s"] = 8
    server = start_server(config)
    stalled = [_stalled_stream(server.port, KEYS["batch"]) for _ in range(4)]
    try:
        wait_until(lambda: sum(w["inflight"] for w in server.pool()) == 4, what="four stalled streams admitted")
        started = time.monotonic()
        status, _, answer = http_json(server.url + "/v1/chat/completions", body("me first", max_tokens=5),
                                      {"Authorization": KEYS["premium"]})
        assert status == 200, answer
        assert time.monotonic() - started < 8
        # every stalled stream is cut by the server, not by the client going away
        wait_until(lambda: server.log().count('"error":"client_too_slow"') == 4, timeout=30,
                   what="four streams cut as too slow")
        wait_until(lambda: sum(w["inflight"] for w in server.pool()) == 0, what="their slots freed")
        assert "Traceback" not in server.log()  # a cut client is an access-log line, not an error
    finally:
        for sock in stalled:
            sock.close()


def test_a_huge_max_tokens_is_refused_and_does_not_stall_other_tiers(start_server):
    """Finding 3: one max_tokens=1000000 request ran alone and premium got 429 behind it."""
    config = fake_config(fake={"token_latency_ms": 2, "output_tokens": 1000000})
    for tier in config["tiers"]:
        tier["queue_timeout_s"] = 3
    server = start_server(config)

    async def run():
        async with aiohttp.ClientSession() as s:
            huge = asyncio.create_task(_post(s, server.url, "batch", body("all of it", max_tokens=1000000)))
            await asyncio.sleep(0)
            premium = await _post(s, server.url, "premium", body("short", max_tokens=5))
            return await huge, premium

    (huge_status, huge_body), (premium_status, _) = asyncio.run(run())
    assert huge_status == 400
    error = json.loads(huge_body)["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert premium_status == 200


def _queues(server):
    return http_json(server.admin + "/admin/pool")[2]["queues"]["main"]


def test_a_shared_generation_waits_at_the_highest_tier_of_its_waiters(start_server):
    """Low finding: a coalesced follower inherited its leader's tier (a premium request could wait
    at batch priority behind a batch leader)."""
    config = fake_config(devices=["cpu"], replicas={"hot": 1}, max_inflight_per_worker=1, max_batch_size=1,
                         fake={"token_latency_ms": 100, "output_tokens": 10})
    config["cache"] = {"scope": "shared"}  # two keys share flights only in a shared scope
    server = start_server(config)
    shared = body("the same question", temperature=0)

    async def run():
        async with aiohttp.ClientSession() as s:
            blocker = asyncio.create_task(_post(s, server.url, "standard", body("hold the slot", temperature=0.5)))
            await asyncio.to_thread(wait_until, lambda: sum(w["inflight"] for w in server.pool()) == 1)
            leader = asyncio.create_task(_post(s, server.url, "batch", shared))
            await asyncio.to_thread(wait_until, lambda: _queues(server)["batch"]["queued"] == 1, what="leader queued")
            follower = asyncio.create_task(_post(s, server.url, "premium", shared))
            moved = await asyncio.to_thread(
                wait_until, lambda: (q := _queues(server))["premium"]["queued"] == 1 and q["batch"]["queued"] == 0,
                what="the shared generation queued at premium")
            return moved, await asyncio.gather(blocker, leader, follower)

    moved, results = asyncio.run(run())
    assert moved and [status for status, _ in results] == [200, 200, 200]
    assert json.loads(results[1][1])["choices"] == json.loads(results[2][1])["choices"]


def _chat(server, tier, payload, headers=None):
    return http_json(server.url + "/v1/chat/completions", payload,
                     {**({"Authorization": KEYS[tier]} if tier else {}), **(headers or {})})


def test_unknown_model_names_never_become_metric_labels(start_server):
    """Finding 4: a 200 KB model name became a permanent label: /metrics grew from 8.6 KB to 411 KB."""
    server = start_server(fake_config())
    before = len(http_json(server.admin + "/metrics")[2])
    for i in range(5):
        status, _, _ = _chat(server, "standard", {**body("x"), "model": f"m{i}" + "z" * 200_000})
        assert status == 404
    metrics = http_json(server.admin + "/metrics")[2]
    assert len(metrics) < before + 4000, (before, len(metrics))
    assert metric_value(metrics, "fullpower_requests_total", model="unknown", status="404") == 5


def test_anonymous_callers_get_no_shared_job_namespace(start_server):
    """Finding 6: anonymous callers listed each other's jobs and reused each other's
    Idempotency-Keys; a key could be named 'anonymous'."""
    config = fake_config(fake={"token_latency_ms": 0})
    config["auth"]["allow_anonymous"], config["auth"]["anonymous_tier"] = True, "batch"
    server = start_server(config)
    job = {"request": body("mine", max_tokens=2)}
    status, _, answer = http_json(server.url + "/v1/jobs", job)
    assert status == 403 and answer["error"]["code"] == "permission_denied"  # jobs.allow_anonymous is off

    config = fake_config(fake={"token_latency_ms": 0})
    config["auth"]["allow_anonymous"], config["auth"]["anonymous_tier"] = True, "batch"
    config["jobs"] = {"allow_anonymous": True}
    server = start_server(config)
    status, _, created = http_json(server.url + "/v1/jobs", job)
    assert status == 202
    assert http_json(server.url + "/v1/jobs")[0] == 403  # no listing for the anonymous tenant
    assert http_json(server.url + "/v1/jobs", job, {"Idempotency-Key": "k1"})[0] == 400
    wait_until(lambda: http_json(f"{server.url}/v1/jobs/{created['id']}")[2]["status"] == "succeeded")

    from proxy.config import ConfigError, parse_config
    import yaml
    config["auth"]["keys"].append({"name": "anonymous", "key": "sk-anon-1234", "tier": "batch"})
    try:
        parse_config(yaml.safe_dump(config))
        raise AssertionError("a key named anonymous was accepted")
    except ConfigError as exc:
        assert any("reserved" in p for p in exc.problems)


def test_cache_is_per_key_by_default_and_a_shared_cache_reports_no_cross_key_hit(start_server):
    """Finding 9: with the shared default scope, X-Fullpower-Cache: hit told a caller that another
    key sent that exact prompt within the TTL."""
    server = start_server(fake_config(fake={"token_latency_ms": 0}))
    prompt = body("a secret question", temperature=0)
    assert _chat(server, "premium", prompt)[1]["X-Fullpower-Cache"] == "miss"
    assert _chat(server, "standard", prompt)[1]["X-Fullpower-Cache"] == "miss"  # its own cache
    assert _chat(server, "standard", prompt)[1]["X-Fullpower-Cache"] == "hit"

    config = fake_config(fake={"token_latency_ms": 0})
    config["cache"] = {"scope": "shared"}
    server = start_server(config)
    assert _chat(server, "premium", prompt)[1]["X-Fullpower-Cache"] == "miss"
    status, headers, _ = _chat(server, "standard", prompt)
    assert status == 200 and headers["X-Fullpower-Cache"] == "miss"  # answered from the cache, not told
    metrics = http_json(server.admin + "/metrics")[2]
    assert metric_value(metrics, "fullpower_cache_requests_total", result="hit") == 1
    assert _chat(server, "premium", prompt)[1]["X-Fullpower-Cache"] == "hit"  # its own entry


def test_a_key_reaches_only_its_tiers_pool_unless_allowed_more(start_server):
    """Low finding: a tier's pool was only a default; any key reached any pool by naming its model."""
    config = fake_config(fake={"token_latency_ms": 0})
    config["pools"].append({"name": "other", "model": "other-model", "engine": "fake", "devices": ["cpu"],
                            "fake": {"token_latency_ms": 0}})
    next(k for k in config["auth"]["keys"] if k["tier"] == "premium")["pools"] = ["other"]
    server = start_server(config)
    other = {**body("hi"), "model": "other-model"}
    status, _, answer = _chat(server, "standard", other)
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert _chat(server, "premium", other)[0] == 200
    models = lambda tier: [m["id"] for m in http_json(server.url + "/v1/models", None,  # noqa: E731
                                                      {"Authorization": KEYS[tier]}, method="GET")[2]["data"]]
    assert models("standard") == ["fake-model"] and models("premium") == ["fake-model", "other-model"]


def test_job_submissions_are_bounded(start_server):
    """Finding 7: no rate limit or size bound on job submission; a list call could serialise a
    huge page on the event loop. Low finding: deeply nested JSON gave 500 with a traceback."""
    config = fake_config(fake={"token_latency_ms": 0})
    key = next(k for k in config["auth"]["keys"] if k["tier"] == "standard")
    key["requests_per_second"] = 2
    config["jobs"] = {"max_queued_per_key": 3, "concurrency": 1}
    server = start_server(config)
    auth = {"Authorization": KEYS["standard"]}
    statuses = [http_json(server.url + "/v1/jobs", {"request": body(f"j{i}")}, auth)[0] for i in range(6)]
    # the key's bucket (2 per second, shared with its jobs as they run) and its queue cap (3) refuse
    assert statuses[0] == 202 and 429 in statuses and statuses.count(202) <= 3, statuses
    big = {"request": body("m"), "metadata": {"blob": "x" * 20000}}
    status, _, answer = http_json(server.url + "/v1/jobs", big, auth)
    assert status == 400 and answer["error"]["param"] == "metadata"
    deep = b'{"request": ' + b'{"a": ' * 5000 + b'1' + b'}' * 5000 + b'}'
    status, _, answer = http_json(server.url + "/v1/jobs", deep, auth)
    assert status == 400, answer
    status, _, page = http_json(server.url + "/v1/jobs?limit=1000", None, auth, method="GET")
    assert status == 200 and len(page["data"]) <= 100
    assert "Traceback" not in server.log()


def test_a_result_that_cannot_be_stored_fails_the_job_with_the_reason(start_server, tmp_path):
    """Finding 5: a job whose result could not be stored (database full) stayed `running` until a
    restart and its result was discarded."""
    config = fake_config(fake={"token_latency_ms": 0, "output_tokens": 30000, "context_length": 40000})
    config["data_dir"] = str(tmp_path / "data")
    config["jobs"] = {"max_db_bytes": 128 * 1024}  # room for jobs, not for a 150 KB result
    config["cache"] = {"enabled": False}
    server = start_server(config)
    auth = {"Authorization": KEYS["standard"]}
    status, _, created = http_json(server.url + "/v1/jobs", {"request": body("long", max_tokens=30000)}, auth)
    assert status == 202, created
    url = f"{server.url}/v1/jobs/{created['id']}"
    job = wait_until(lambda: (j := http_json(url, None, auth, method="GET")[2])["status"] not in ("queued", "running")
                     and j, timeout=60, what="job ended")
    assert job["status"] == "failed" and "could not be stored" in job["error"], job
    assert "full" in job["error"]  # the real SQLite error, not a failed ROLLBACK
    # the loops survived: a small job still runs
    status, _, small = http_json(server.url + "/v1/jobs", {"request": body("short", max_tokens=2)}, auth)
    assert status == 202
    wait_until(lambda: http_json(f"{server.url}/v1/jobs/{small['id']}", None, auth, method="GET")[2]["status"]
               == "succeeded", what="small job succeeded")


# --- the admin surface and callbacks (finding 1, low findings on the admin API and callbacks) --
def test_admin_api_needs_its_token_and_refuses_cross_site_requests(start_server):
    server = start_server(fake_config())
    kill = server.admin + "/admin/workers/main-0/kill"
    assert http_json(kill, b"", {"Authorization": ""})[0] == 401
    assert http_json(kill, b"", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    from tests.conftest import ADMIN_TOKEN
    status, _, answer = http_json(kill, b"", {"Authorization": f"Bearer {ADMIN_TOKEN}", "Origin": "http://evil.test"})
    assert status == 403 and answer["error"]["code"] == "permission_denied"
    assert http_json(server.admin + "/admin/jobs", None, {"Authorization": ""}, method="GET")[0] == 401
    assert http_json(server.admin + "/metrics", None, {"Authorization": ""}, method="GET")[0] == 200  # read-only
    assert all(w["restarts"] == 0 for w in server.pool())


def test_callbacks_never_reach_the_appliances_own_listeners(start_server, tmp_path):
    """Finding 1: with callback_allow ['127.0.0.0/8'] a job's callback_url on the admin port killed
    a worker."""
    config = fake_config(fake={"token_latency_ms": 0})
    config["data_dir"] = str(tmp_path / "data")
    config["jobs"] = {"callback_allow": ["127.0.0.0/8", "::1/128"]}
    next(k for k in config["auth"]["keys"] if k["tier"] == "standard")["callback_secret"] = "whsec-123456"
    server = start_server(config)
    for target in (f"http://127.0.0.1:{server.admin_port}/admin/workers/main-0/kill",
                   f"http://localhost:{server.admin_port}/admin/reload",
                   f"http://127.0.0.2:{server.port}/v1/jobs"):
        status, _, answer = http_json(server.url + "/v1/jobs", {"request": body("x"), "callback_url": target},
                                      {"Authorization": KEYS["standard"]})
        assert status == 400 and answer["error"]["code"] == "callback_not_allowed", (target, answer)
        assert "own listeners" in answer["error"]["message"]
    assert all(w["restarts"] == 0 for w in server.pool())


def test_internal_addresses_in_every_form_are_not_public():
    import ipaddress

    from proxy.jobs.callbacks import CallbackPolicy, is_public

    internal = ["100.64.0.1", "100.100.100.200", "169.254.169.254", "10.1.2.3", "127.0.0.1", "::1", "fe80::1",
                "fd00::1", "::ffff:127.0.0.1", "2002:a9fe:a9fe::1", "2002:7f00:1::1", "64:ff9b::a9fe:a9fe",
                "64:ff9b:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "0.0.0.0"]
    for address in internal:
        assert not is_public(ipaddress.ip_address(address)), address
    for address in ("8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1"):
        assert is_public(ipaddress.ip_address(address)), address
    policy = CallbackPolicy(["hooks.example.com", "10.0.0.0/8"], own_listeners=[("0.0.0.0", 8080)])
    assert policy.allowed("hooks.example.com", ipaddress.ip_address("8.8.8.8"), 443) is None
    assert policy.allowed("hooks.example.com", ipaddress.ip_address("100.64.0.1"), 443)  # a name with an internal address
    assert policy.allowed("x", ipaddress.ip_address("10.0.0.5"), 80) is None  # a listed CIDR
    assert "own listeners" in policy.allowed("x", ipaddress.ip_address("10.0.0.5"), 8080)


def test_a_dns_failure_at_delivery_is_retried_not_final():
    """Finding 8: a temporary DNS failure abandoned a callback for good."""
    from proxy.jobs.callbacks import CallbackSender
    from proxy.metrics import Metrics

    class Store:
        async def callback_result(self, job_id, status, error, delivered, next_at):
            self.result = (status, error, delivered, next_at)
            return "pending" if next_at else "failed"

    async def run():
        sender = CallbackSender(Store(), Metrics(), public=lambda job: {"id": job["id"]})
        sender.reconfigure(["nonexistent.invalid"], [], {}, 2.0)

        async def no_dns(url):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        sender.policy.resolve = no_dns
        async with aiohttp.ClientSession() as session:
            await sender._deliver(session, {"id": "job_1", "key_name": "k", "callback_url": "http://nonexistent.invalid/h",
                                            "callback_attempts": 0})
        return sender.store.result

    status, error, delivered, next_at = asyncio.run(run())
    assert not delivered and next_at is not None and "gaierror" in error


class _Targets:
    """Callback targets on loopback, in a thread: /fast answers at once, /slow after 6 s, /endless
    answers 200 with a body that never ends."""

    def __init__(self):
        import threading

        from aiohttp import web

        from tests.conftest import free_port
        self.port = free_port()
        self.seen: dict[str, float] = {}
        ready = threading.Event()

        async def fast(request):
            self.seen.setdefault("fast", time.monotonic())
            return web.Response(status=204)

        async def slow(request):
            self.seen.setdefault("slow", time.monotonic())
            await asyncio.sleep(6)
            return web.Response(status=204)

        async def endless(request):
            self.seen.setdefault("endless", time.monotonic())
            response = web.StreamResponse()
            await response.prepare(request)
            while True:
                await response.write(b"x" * 65536)
                await asyncio.sleep(0.01)

        def serve():
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/fast", fast)
            app.router.add_post("/slow", slow)
            app.router.add_post("/endless", endless)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)


def test_a_slow_or_endless_callback_target_delays_only_itself(start_server, tmp_path):
    """Low finding: callback bodies were read without a limit and one slow target delayed the
    whole delivery batch."""
    targets = _Targets()
    config = fake_config(fake={"token_latency_ms": 0})
    config["data_dir"] = str(tmp_path / "data")
    config["jobs"] = {"callback_allow": ["127.0.0.0/8"], "callback_timeout_s": 10}
    next(k for k in config["auth"]["keys"] if k["tier"] == "standard")["callback_secret"] = "whsec-123456"
    server = start_server(config)
    ids = {}
    for name in ("slow", "endless", "fast"):
        status, _, job = http_json(server.url + "/v1/jobs", {"request": body(name, max_tokens=2),
                                                             "callback_url": f"http://127.0.0.1:{targets.port}/{name}"},
                                   {"Authorization": KEYS["standard"]})
        assert status == 202
        ids[name] = job["id"]

    def attempts(name):
        return http_json(f"{server.admin}/admin/jobs/{ids[name]}")[2]["callback"]["attempts"]

    wait_until(lambda: attempts("fast"), timeout=10, what="fast target called back")
    wait_until(lambda: attempts("endless"), timeout=10, what="endless target answered")
    assert attempts("endless")[0]["status"] == 200  # the body was cut short, not read until the timeout
    assert not attempts("slow")  # still waiting for its slow target, and nobody waited for it
    assert "slow" in targets.seen


def test_admin_listen_off_loopback_is_flagged_by_check_config(tmp_path):
    import subprocess

    import yaml

    from tests.conftest import FULLPOWER, ROOT
    config = fake_config()
    config["admin_listen"] = "0.0.0.0:9191"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(FULLPOWER + ["check-config", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "warning: admin_listen 0.0.0.0:9191 is not a loopback address" in result.stderr


def test_reload_keeps_the_listen_given_on_the_command_line(start_server, tmp_path):
    """Low finding: `serve --listen` made every later reload fail ("listen: changing it needs a restart")."""
    import subprocess

    import yaml

    from tests.conftest import FULLPOWER, ROOT, Server, free_port
    server = Server(fake_config(), tmp_path)
    override = free_port()
    server.proc = subprocess.Popen(FULLPOWER + ["serve", "--config", str(server.config_path), "--listen",
                                                f"127.0.0.1:{override}"], cwd=ROOT,
                                   stdout=open(server.log_path, "wb"), stderr=subprocess.STDOUT)
    server._log = open(server.log_path, "rb")
    try:
        server.port = override
        server.wait_ready()
        grown = yaml.safe_load(server.config_path.read_text())
        grown["tiers"][0]["weight"] = 9
        server.config_path.write_text(yaml.safe_dump(grown))
        status, _, answer = http_json(server.admin + "/admin/reload", b"")
        assert status == 200 and answer["ok"], answer
        assert _chat(server, "premium", body("still here"))[0] == 200
    finally:
        server.stop()


def test_a_corrupt_disk_cache_is_rebuilt_and_can_be_cleared(start_server, tmp_path):
    """Low finding: a corrupt cache.db was never repaired and `cache clear` could not clear it."""
    config = fake_config(fake={"token_latency_ms": 0})
    config["data_dir"] = str(tmp_path / "data")
    cache_dir = tmp_path / "data" / "cache"
    cache_dir.mkdir(parents=True)
    (cache_dir / "cache.db").write_bytes(b"this is not a database" * 100)
    server = start_server(config)
    prompt = body("cache me", temperature=0)
    assert _chat(server, "standard", prompt)[1]["X-Fullpower-Cache"] == "miss"
    assert "is corrupt" in server.log()
    stats = http_json(server.admin + "/admin/cache", None, method="GET")[2]
    assert stats["disk_available"] and stats["disk_entries"] == 1
    assert http_json(server.admin + "/admin/cache/clear", b"")[2]["cleared"] >= 1


def test_parser_errors_are_json_and_name_no_library_versions(fake_server):
    """Low finding: parser-level errors answered in aiohttp's plain text, echoing the header, with
    a Server header naming the aiohttp and Python versions."""
    smuggle = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
               b"Transfer-Encoding: chunked\r\nX-Probe: <script>probe</script>\r\n\r\n0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=10) as sock:
        sock.sendall(smuggle)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert b"Server: fullpower" in head and b"aiohttp" not in head and b"Python" not in head
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    assert b"chunked" not in payload and b"script" not in payload
    status, headers, _ = http_json(fake_server.url + "/healthz")
    assert status == 200 and headers["Server"] == "fullpower"
    assert "Traceback" not in fake_server.log()
