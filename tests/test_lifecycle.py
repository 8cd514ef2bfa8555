"""The appliance's lifecycle through real processes: a failed start unwinds what had started, a
SIGTERM under load ends inside the systemd stop budget, and jobs run without the public listener."""

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from proxy.jobs.db import JobDb
from tests.conftest import FULLPOWER, ROOT, Server, fake_config, http_json, process_alive, wait_until
from tests.test_request_path import KEYS, body, read_stream


def worker_processes(marker: str) -> list[int]:
    """Live worker processes whose command line carries `marker` (a per-test data directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "-m backend" in cmdline and marker in cmdline and process_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("taken", ["listen", "admin_listen"])
def test_serve_with_a_port_taken_exits_with_one_line_and_leaves_nothing(tmp_path, taken):
    server = Server(fake_config(fake={"boot_delay_ms": 0}), tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", server.port if taken == "listen" else server.admin_port))
    blocker.listen()
    try:
        proc = subprocess.Popen(FULLPOWER + ["serve", "--config", str(server.config_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # say what was still running (the proxy, or a worker holding our pipe)
            alive = subprocess.run(["ps", "-eo", "pid,ppid,etimes,args"], capture_output=True, text=True).stdout
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"serve did not finish within 60s\n{err}\n{alive}") from None
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot listen on 127.0.0.1:" in errors[0], err
    # the workers had been spawned before the bind failed (the pools start first): they were stopped
    assert "spawned" in err
    assert not worker_processes(server.config["data_dir"])


def test_sigterm_under_load_ends_inside_the_systemd_stop_budget(start_server):
    unit = (ROOT / "systemd/fullpower.service").read_text()
    stop_budget_s = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    config = fake_config(fake={"token_latency_ms": 50, "output_tokens": 2000})  # streams outlast the drain
    config["timeouts"] = {"drain_s": 3}
    config["workers"]["stop_grace_s"] = 3
    server = start_server(config)
    pids = server.worker_pids()
    results = []

    def stream(i):
        try:
            results.append(read_stream(server.url, body(f"long {i}", stream=True, max_tokens=2000),
                                       KEYS["standard"]))
        except (OSError, http.client.HTTPException) as exc:  # cut when the drain period ran out
            results.append(exc)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(w["inflight"] for w in server.pool()) == 8, what="eight streams in flight")
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=stop_budget_s) == 0
    took = time.monotonic() - started
    # drain (3 s) + workers' grace (3 s) + margin; the unit allows TimeoutStopSec for the defaults
    assert took < 3 + 3 + 5 < stop_budget_s, took
    for t in threads:
        t.join(30)
    assert len(results) == 8  # every stream was ended (cut after the drain), none left hanging
    assert not any(process_alive(p) for p in pids)
    assert "drain period over; cancelling 8 requests" in server.log()


def test_jobs_run_with_no_public_listener(tmp_path):
    config = fake_config(fake={"token_latency_ms": 0})
    config["data_dir"] = str(tmp_path / "data")
    server = Server(config, tmp_path)
    # Jobs queued earlier (by this host or another sharing the store), then a host with no public
    # listener at all: the runner executes them in-process.
    db = JobDb(Path(config["data_dir"]) / "jobs.sqlite3", 0)
    key_name = next(k["name"] for k in config["auth"]["keys"] if k["tier"] == "standard")
    ids = [db.create(key_name, None, "/v1/chat/completions", {**body(f"offline {i}", max_tokens=4), "stream": False},
                     None, None, 3600.0, 60.0)[0]["id"] for i in range(3)]
    db.close()
    server.config["listen"] = ""
    server.config_path.write_text(yaml.safe_dump(server.config))
    server.start(wait_ready=False)
    try:
        def job(job_id):
            try:
                status, _, payload = http_json(f"{server.admin}/admin/jobs/{job_id}", timeout=5)
            except OSError:  # the admin listener is not up yet
                return None
            return payload if status == 200 and payload["status"] == "succeeded" else None

        for job_id in ids:
            done = wait_until(lambda: job(job_id), timeout=60, what=f"job {job_id} succeeded")
            assert done["result"]["choices"][0]["message"]["content"]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        assert "no public listener" in server.log()
    finally:
        server.stop()


def test_connections_made_during_a_restart_wait_for_the_next_process_with_socket_activation(tmp_path):
    """sd_listen_fds(3) as systemd-socket-activate or a .socket unit passes it: the harness holds the
    listening socket across a graceful restart; requests sent while no process serves wait in its
    queue and are answered by the next process - none refused, none failed."""
    import os

    server = Server(fake_config(fake={"boot_delay_ms": 0, "token_latency_ms": 1, "output_tokens": 4}), tmp_path)
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", server.port))
    held.listen(1024)
    log = open(tmp_path / "activated.log", "ab")

    def start():
        # the service manager's part: the socket as descriptor 3, LISTEN_PID the server's own pid
        cmd = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=public exec "$@"', "sh",
               *FULLPOWER, "serve", "--config", str(server.config_path)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, close_fds=False,
                                preexec_fn=lambda: os.dup2(held.fileno(), 3))
        server.proc = proc
        server.wait_ready(timeout=60)
        return proc

    results: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                conn.request("POST", "/v1/chat/completions", body=json.dumps(body(max_tokens=4)), headers={
                    "Authorization": KEYS["standard"], "Content-Type": "application/json", "Connection": "close"})
                results.append(conn.getresponse().status)
                conn.close()
            except OSError as exc:
                results.append(repr(exc))

    try:
        first = start()
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 20, timeout=30, what="traffic before the restart")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        during = len(results)
        second = start()  # meanwhile connections queue in the held socket
        wait_until(lambda: len(results) >= during + 20, timeout=60, what="traffic after the restart")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        failed = [r for r in results if r != 200]
        assert not failed, failed[:5]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        stop.set()
        held.close()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
        log.close()
    text = (tmp_path / "activated.log").read_text(errors="replace")
    assert text.count("socket passed by the service manager, for public") == 2, text[-3000:]
