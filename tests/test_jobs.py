"""Async jobs through real `fullpower serve` processes (fake engine): durability across a SIGKILL,
priority of interactive traffic, idempotency, cancellation, expiry, isolation, signed callbacks
with retries, the allowlist, and a full database."""

import asyncio
import hashlib
import hmac
import json
import sqlite3
import threading
import time

import aiohttp
from aiohttp import web

from tests.conftest import fake_config, free_port, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body

SECRETS = {"premium": "whsec-premium-123", "standard": "whsec-standard-456", "batch": "whsec-batch-789"}


def jobs_config(tmp_path, **fake):
    config = fake_config(fake={"token_latency_ms": 0, **fake})
    for key in config["auth"]["keys"]:
        key["callback_secret"] = SECRETS[key["tier"]]
    config["data_dir"] = str(tmp_path / "data")
    config["jobs"] = {"callback_allow": ["127.0.0.0/8"], "concurrency": 16}
    return config


class Receiver:
    """A callback receiver on loopback that verifies signatures; fails the first `fail_first` posts."""

    def __init__(self, fail_first=0):
        self.port = free_port()
        self.fail_first = fail_first
        self.posts: list[dict] = []
        self.bad_signatures = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request):
        raw = await request.read()
        sig = dict(part.split("=", 1) for part in request.headers["X-Fullpower-Signature"].split(","))
        job = json.loads(raw)
        key = job["metadata"]["tier"]
        expected = hmac.new(SECRETS[key].encode(), sig["t"].encode() + b"." + raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig["v1"]):
            self.bad_signatures += 1
            return web.Response(status=400)
        self.posts.append(job)
        if len(self.posts) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=204)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()


def submit(server, tier="standard", callback=None, idem=None, prompt="job", **extra):
    payload = {"request": body(prompt, max_tokens=4), "metadata": {"tier": tier}, **extra}
    if callback:
        payload["callback_url"] = callback
    headers = {"Authorization": KEYS[tier]}
    if idem:
        headers["Idempotency-Key"] = idem
    return http_json(server.url + "/v1/jobs", payload, headers)


def get(server, job_id, tier="standard"):
    return http_json(server.url + f"/v1/jobs/{job_id}", headers={"Authorization": KEYS[tier]})


def test_thousand_jobs_survive_a_sigkill_exactly_once(start_server, tmp_path):
    receiver = Receiver()
    config = jobs_config(tmp_path, token_latency_ms=2, output_tokens=4)
    server = start_server(config)

    async def flood():
        async with aiohttp.ClientSession() as s:
            async def one(i):
                async with s.post(server.url + "/v1/jobs", json={
                        "request": body(f"job {i}", max_tokens=4), "metadata": {"tier": "batch"},
                        "callback_url": receiver.url}, headers={"Authorization": KEYS["batch"]}) as resp:
                    assert resp.status == 202
                    return (await resp.json())["id"]
            return await asyncio.gather(*(one(i) for i in range(1000)))
    ids = asyncio.run(flood())
    assert len(set(ids)) == 1000
    db = tmp_path / "data" / "jobs.sqlite3"

    def count(status):
        with sqlite3.connect(db) as c:
            return c.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]
    wait_until(lambda: count("succeeded") >= 150, interval=0.01, what="some jobs done")
    server.proc.kill()  # SIGKILL in the middle of execution
    server.proc.wait()
    assert count("succeeded") < 1000
    restarted = start_server(config)  # same data_dir, new ports
    wait_until(lambda: count("succeeded") == 1000, timeout=120, what="every job succeeded")
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT id, status, result, attempts FROM jobs").fetchall()
    assert len(rows) == 1000 and {r[0] for r in rows} == set(ids)
    assert all(r[1] == "succeeded" and json.loads(r[2])["choices"] for r in rows)
    wait_until(lambda: len({p["id"] for p in receiver.posts}) == 1000, timeout=60, what="callbacks")
    assert receiver.bad_signatures == 0 and {p["id"] for p in receiver.posts} == set(ids)
    assert get(restarted, ids[0], "batch")[2]["status"] == "succeeded"


def test_interactive_requests_go_ahead_of_a_job_backlog(start_server, tmp_path):
    config = jobs_config(tmp_path, token_latency_ms=15, output_tokens=8)
    config["pools"][0].update(max_inflight_per_worker=2, max_batch_size=2)
    config["jobs"]["concurrency"] = 64
    server = start_server(config)
    for i in range(120):
        assert submit(server, "batch", prompt=f"backlog {i}")[0] == 202
    wait_until(lambda: http_json(server.admin + "/admin/pool")[2]["queues"]["main"]["batch"]["queued"] > 0,
               what="the backlog queued at the batch tier")
    finished_before = []
    for i in range(5):
        status, headers, _ = http_json(server.url + "/v1/chat/completions", body(f"interactive {i}", max_tokens=8),
                                       {"Authorization": KEYS["premium"]})
        assert status == 200
        listing = http_json(server.admin + "/admin/jobs?status=succeeded&limit=1000")[2]
        finished_before.append(len(listing["data"]))
    # every interactive request was served while most of the backlog still waited
    assert max(finished_before) < 100, finished_before
    succeeded = lambda: metric_value(http_json(server.admin + "/metrics")[2],  # noqa: E731
                                     "fullpower_jobs_finished_total", status="succeeded")
    wait_until(lambda: succeeded() == 120, timeout=60, what="backlog drained")


def test_idempotency_isolation_cancellation_and_listing(start_server, tmp_path):
    config = jobs_config(tmp_path, token_latency_ms=200, output_tokens=50)
    config["jobs"]["concurrency"] = 1
    server = start_server(config)
    status, _, first = submit(server, idem="order-42")
    again = submit(server, idem="order-42")
    assert status == 202 and again[0] == 200 and again[2]["id"] == first["id"]
    other_key = submit(server, "premium", idem="order-42")
    assert other_key[2]["id"] != first["id"]  # idempotency keys are per API key
    assert get(server, first["id"], "premium")[0] == 404  # a key never sees another key's jobs
    queued = submit(server, prompt="to cancel")[2]
    status, _, cancelled = http_json(server.url + f"/v1/jobs/{queued['id']}", headers={"Authorization": KEYS["standard"]},
                                     method="DELETE")
    assert status == 200 and cancelled["status"] == "cancelled"
    wait_until(lambda: get(server, first["id"])[2]["status"] == "running", what="first job running")
    status, _, running = http_json(server.url + f"/v1/jobs/{first['id']}", headers={"Authorization": KEYS["standard"]},
                                   method="DELETE")
    assert status == 200 and running["status"] == "cancelled"
    time.sleep(1.0)
    assert get(server, first["id"])[2]["status"] == "cancelled"  # the cancelled run stored nothing
    listing = http_json(server.url + "/v1/jobs?limit=10", headers={"Authorization": KEYS["standard"]})[2]
    assert {j["id"] for j in listing["data"]} == {first["id"], queued["id"]}
    page = http_json(server.url + "/v1/jobs?limit=1", headers={"Authorization": KEYS["standard"]})[2]
    nxt = http_json(server.url + f"/v1/jobs?limit=1&after={page['last_id']}",
                    headers={"Authorization": KEYS["standard"]})[2]
    assert page["has_more"] and nxt["data"][0]["id"] != page["data"][0]["id"]
    assert http_json(server.url + "/v1/jobs", {"request": {"model": "fake-model"}},
                     {"Authorization": KEYS["standard"]})[0] == 400  # a bad request fails at submission


def test_expiry(start_server, tmp_path):
    config = jobs_config(tmp_path)
    config["jobs"].update(expire_after_s=0.5, concurrency=1)
    config["pools"][0]["fake"] = {"token_latency_ms": 300, "output_tokens": 20}
    server = start_server(config)
    ids = [submit(server, prompt=f"slow {i}")[2]["id"] for i in range(4)]
    wait_until(lambda: any(get(server, i)[2]["status"] == "expired" for i in ids), timeout=30, what="an expiry")
    expired = [get(server, i)[2] for i in ids if get(server, i)[2]["status"] == "expired"]
    assert expired and all("expired" in j["error"] for j in expired)


def test_callback_signature_retries_and_allowlist(start_server, tmp_path):
    receiver = Receiver(fail_first=2)
    config = jobs_config(tmp_path)
    server = start_server(config)
    status, _, job = submit(server, "premium", callback=receiver.url)
    assert status == 202
    wait_until(lambda: len(receiver.posts) >= 3, timeout=30, what="delivered after two failures")
    assert receiver.bad_signatures == 0
    assert {p["id"] for p in receiver.posts} == {job["id"]} and receiver.posts[-1]["status"] == "succeeded"
    detail = http_json(server.admin + f"/admin/jobs/{job['id']}")[2]
    assert [a["status"] for a in detail["callback"]["attempts"]] == [500, 500, 204]
    assert detail["callback"]["state"] == "delivered"
    # the allowlist: a target outside it is refused at submission
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest", "ftp://127.0.0.1/x"):
        status, _, err = submit(server, "premium", callback=url)
        assert status == 400 and err["error"]["param"] == "callback_url", (url, err)


def test_full_database_gives_503_and_loses_nothing(start_server, tmp_path):
    config = jobs_config(tmp_path)
    config["jobs"]["max_db_bytes"] = 160_000
    server = start_server(config)
    accepted, refused = [], 0
    for i in range(400):
        status, headers, payload = submit(server, prompt=f"{'x' * 400} {i}")
        if status == 202:
            accepted.append(payload["id"])
        else:
            assert status == 503 and payload["error"]["code"] == "job_store_unavailable" and headers["Retry-After"]
            refused += 1
            if refused > 5:
                break
    assert accepted and refused
    # Everything accepted before the database filled up is still there, intact and not failed.
    time.sleep(1.0)
    for job_id in accepted:
        status, _, job = get(server, job_id)
        assert status == 200 and job["status"] in ("queued", "running", "succeeded"), job
    assert http_json(server.url + "/v1/chat/completions", body("still serving", max_tokens=2),
                     {"Authorization": KEYS["standard"]})[0] == 200


def test_jobs_cli(start_server, tmp_path):
    import subprocess
    from tests.conftest import FULLPOWER, ROOT
    config = jobs_config(tmp_path, token_latency_ms=300, output_tokens=30)
    config["jobs"]["concurrency"] = 1
    server = start_server(config)
    ids = [submit(server, prompt=f"cli {i}")[2]["id"] for i in range(2)]
    admin = ["--admin", f"127.0.0.1:{server.admin_port}", "--admin-token-file", server.config["admin_token_file"]]

    def cli(*args):
        return subprocess.run(FULLPOWER + ["jobs", *args, *admin], cwd=ROOT, capture_output=True, text=True, timeout=60)
    listing = cli("list")
    assert listing.returncode == 0 and all(i in listing.stdout for i in ids)
    assert cli("cancel", ids[1]).returncode == 0 and "cancelled" in cli("show", ids[1]).stdout
    assert cli("retry", ids[1]).returncode == 0
    wait_until(lambda: json.loads(cli("show", ids[1]).stdout)["status"] == "succeeded", timeout=60, what="retried")
    assert cli("show", "job_nope").returncode == 1


def test_unwritable_database_gives_503_while_the_rest_serves(start_server, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the job database's directory should be")
    config = jobs_config(tmp_path)
    config["jobs"]["db_path"] = str(blocker / "jobs.sqlite3")
    server = start_server(config)
    status, headers, payload = submit(server)
    assert status == 503 and payload["error"]["code"] == "job_store_unavailable" and headers["Retry-After"]
    assert get(server, "job_x")[0] == 503
    assert http_json(server.url + "/v1/chat/completions", body("interactive", max_tokens=2),
                     {"Authorization": KEYS["standard"]})[0] == 200
    assert "unusable" in server.log()


def test_a_lost_lease_stops_only_the_attempt_it_was_about():
    """A renewal answers about the attempts it was sent for. While one is on its way a job may
    finish here, or be claimed here again after its lease ran out (a new attempt, with a new
    lease): neither is stopped by the late answer; an attempt whose lease really went is."""
    from proxy.jobs.runner import JobRunner

    async def main():
        def parked():
            return asyncio.create_task(asyncio.sleep(60))

        class Store:
            calls = 0

            async def renew(self, attempts):
                self.calls += 1
                if self.calls > 1:
                    return []  # the later renewals find every lease held
                assert attempts == {"finished": 1, "claimed-again": 1, "taken-over": 1}
                runner._attempts.pop("finished")  # it ended here meanwhile
                runner.running.pop("finished").cancel()
                runner.running["claimed-again"].cancel()  # ...and this one was claimed here anew
                runner.running["claimed-again"], runner._attempts["claimed-again"] = parked(), 2
                return list(attempts)  # none of the three is still held as sent

        runner = JobRunner(Store(), None, None, None, None)
        for job_id in ("finished", "claimed-again", "taken-over"):
            runner.running[job_id], runner._attempts[job_id] = parked(), 1
        taken_over = runner.running["taken-over"]
        leases = asyncio.create_task(runner.keep_leases(0.2))  # renews every 0.05 s
        try:
            deadline = time.monotonic() + 30
            while not taken_over.done():
                assert time.monotonic() < deadline, "the attempt whose lease was lost still runs"
                await asyncio.sleep(0.01)
            assert taken_over.cancelled() and "taken-over" not in runner._attempts
            assert not runner.running["claimed-again"].done() and runner._attempts["claimed-again"] == 2
        finally:
            leases.cancel()
            for task in runner.running.values():
                task.cancel()
            await asyncio.gather(leases, *runner.running.values(), return_exceptions=True)

    asyncio.run(main())
