"""Workers outlive a proxy that dies: the next proxy adopts them with their models loaded (same
pids, no second load), replaces the ones whose settings changed, and a worker that no proxy adopts
exits after its orphan timeout. Real `fullpower serve` and worker processes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

import yaml

from tests.conftest import FULLPOWER, Server, fake_config, http_json, process_alive, wait_until
from tests.test_request_path import KEYS, body


def kill_proxy(server: Server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    server._log.close()


def restart_with(server: Server, config: dict | None = None) -> Server:
    """The same proxy (ports, data directory, log file) started again, optionally with a new config."""
    if config is not None:
        server.config = {**server.config, **config}
        server.config_path.write_text(yaml.safe_dump(server.config))
    return server.start()


def test_a_sigkilled_proxy_is_restarted_and_adopts_its_workers(start_server, tmp_path):
    server = start_server(fake_config())
    before = {w["id"]: w["pid"] for w in server.pool()}
    assert len(before) == 2
    socket_dir = tmp_path / "data" / "run"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((socket_dir / f"{i}.sock").stat().st_mode) == 0o600 for i in before)
    kill_proxy(server)
    assert all(process_alive(pid) for pid in before.values())  # the models stay loaded
    restart_with(server)
    after = server.pool()
    assert {w["id"]: w["pid"] for w in after} == before
    assert all(w["adopted"] and w["state"] == "ready" and w["age_s"] > 0 for w in after)
    shown = subprocess.run([*FULLPOWER, "status", "--config", str(server.config_path)], capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.count(" adopted") == 2, shown.stdout
    status, _, answer = http_json(server.url + "/v1/chat/completions", body(max_tokens=4),
                                  {"Authorization": KEYS["standard"]})
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    log = server.log_path.read_text()
    for worker_id, pid in before.items():
        assert log.count(f"[{worker_id} pid={pid}] engine fake ready") == 1  # loaded once
        assert f"worker {worker_id} adopted (pid {pid}" in log
    # A graceful stop still stops them.
    server.stop()
    wait_until(lambda: not any(process_alive(p) for p in before.values()), what="workers stopped")


def test_a_changed_model_or_device_replaces_the_worker_instead(start_server):
    server = start_server(fake_config())
    before = {w["id"]: w["pid"] for w in server.pool()}
    kill_proxy(server)
    changed = fake_config(fake={"output_tokens": 5})  # other engine settings: another worker
    restart_with(server, {"pools": changed["pools"]})
    after = {w["id"]: w for w in server.pool()}
    assert all(after[i]["pid"] != pid and not after[i]["adopted"] for i, pid in before.items())
    wait_until(lambda: not any(process_alive(p) for p in before.values()), what="old workers gone")
    assert "runs with other settings, device or model than the config's: replacing it" in server.log_path.read_text()
    status, _, answer = http_json(server.url + "/v1/chat/completions", body(max_tokens=50),
                                  {"Authorization": KEYS["standard"]})
    assert status == 200 and answer["usage"]["completion_tokens"] < 16  # the new settings (16 before)


def test_requests_of_a_dead_proxy_are_cancelled_in_the_worker(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 50, "output_tokens": 2000}))
    import threading

    def long_request():
        try:
            http_json(server.url + "/v1/chat/completions", body(max_tokens=2000), {"Authorization": KEYS["standard"]},
                      timeout=60)
        except OSError:
            pass  # its proxy is killed under it

    threading.Thread(target=long_request, daemon=True).start()
    wait_until(lambda: sum(w["engine_running"] for w in server.pool()) == 1, what="a long request running")
    kill_proxy(server)
    restart_with(server)
    # The adopted worker reports an idle engine: the dead proxy's request was cancelled.
    wait_until(lambda: all(w["adopted"] for w in server.pool())
               and sum(w["engine_running"] + w["engine_waiting"] for w in server.pool()) == 0,
               timeout=10, what="the orphaned request cancelled")


def test_an_orphaned_worker_exits_after_its_timeout(start_server):
    config = fake_config()
    config["workers"]["orphan_timeout_s"] = 2
    server = start_server(config)
    pids = server.worker_pids()
    kill_proxy(server)
    wait_until(lambda: not any(process_alive(p) for p in pids), timeout=20, what="orphans gone")
    log = server.log_path.read_text()
    assert "no proxy for 2s (workers.orphan_timeout_s): exiting" in log
    assert not any((server.config_path.parent / "data" / "run").glob("*.sock"))  # they removed their sockets
    assert os.path.isdir(server.config_path.parent / "data" / "run")


def test_the_operator_paths_restart_reload_hand_over_and_crash(start_server):
    """What systemd does on each path (the unit: Restart=always, KillMode=process), played by hand:
    `systemctl restart` = SIGTERM then start: workers stopped, models loaded again;
    `systemctl reload` = SIGHUP: workers kept; `systemctl kill -s USR2 --kill-whom=main` then the
    automatic restart: workers handed over; a crash then the automatic restart: workers adopted."""
    server = start_server(fake_config())
    first = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)  # reload
    wait_until(lambda: "config reloaded" in server.log_path.read_text(), what="reloaded")
    assert set(server.worker_pids()) == first
    server.proc.send_signal(signal.SIGUSR2)  # hand over
    assert server.proc.wait(30) == 0
    server._log.close()
    assert all(process_alive(p) for p in first)
    restart_with(server)
    assert set(server.worker_pids()) == first and all(w["adopted"] for w in server.pool())
    kill_proxy(server)  # crash
    restart_with(server)
    assert set(server.worker_pids()) == first
    assert server.stop(signal.SIGTERM) == 0  # restart: stop ...
    wait_until(lambda: not any(process_alive(p) for p in first), what="workers stopped with the proxy")
    restart_with(server)  # ... and start: new workers
    assert not set(server.worker_pids()) & first


def test_the_adoption_digest_changes_with_settings_device_protocol_and_model_files(tmp_path, monkeypatch):
    from proxy.fleet.process import settings_digest, worker_socket_path

    model = tmp_path / "model"
    model.mkdir()
    (model / "fullpower-manifest.json").write_text('{"files": {"a": "1"}}')
    base = settings_digest('{"model_name": "m"}', "cuda:0", model)
    assert settings_digest('{"model_name": "m"}', "cuda:0", model) == base
    assert settings_digest('{"model_name": "m"}', "cuda:1", model) != base  # another device
    assert settings_digest('{"model_name": "n"}', "cuda:0", model) != base  # another model or setting
    (model / "fullpower-manifest.json").write_text('{"files": {"a": "2"}}')
    assert settings_digest('{"model_name": "m"}', "cuda:0", model) != base  # the model replaced on disk
    (model / "fullpower-manifest.json").write_text('{"files": {"a": "1"}}')
    assert settings_digest('{"model_name": "m"}', "cuda:0", model) == base
    monkeypatch.setattr("proxy.fleet.process.PROTOCOL_VERSION", -1)
    assert settings_digest('{"model_name": "m"}', "cuda:0", model) != base  # a worker of another protocol
    # A data directory too deep for a Unix socket path gets a short private one, never a shared one.
    deep = tmp_path / ("d" * 120)
    short = worker_socket_path(deep, "main-0")
    assert len(str(short)) <= 100 and short != worker_socket_path(tmp_path / ("e" * 120), "main-0")
    assert worker_socket_path(tmp_path, "main-0") == tmp_path / "run" / "main-0.sock"


def test_a_hung_worker_left_by_a_dead_proxy_is_replaced_not_adopted(start_server):
    server = start_server(fake_config())
    before = server.worker_pids()
    kill_proxy(server)
    os.kill(before[0], signal.SIGSTOP)  # hung: its socket accepts, it never answers
    restart_with(server)
    after = {w["id"]: w for w in server.pool()}
    assert before[0] not in {w["pid"] for w in after.values()}
    assert before[1] in {w["pid"] for w in after.values() if w["adopted"]}
    wait_until(lambda: not process_alive(before[0]), what="the hung worker stopped")
    assert "does not answer: stopping it" in server.log_path.read_text()
