"""Backup while serving, restore on a fresh data directory, and refusals that change nothing."""

import json
import shutil
import subprocess
import threading

import yaml

from tests.conftest import FULLPOWER, ROOT, Server, wait_until
from tests.test_jobs import get, jobs_config, submit


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(FULLPOWER + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_backup_while_serving_then_restore_on_a_fresh_data_dir(tmp_path):
    server = Server(jobs_config(_mk(tmp_path / "a")), tmp_path / "a").start()
    ids = []
    try:
        for i in range(20):
            status, _, job = submit(server, prompt=f"before {i}")
            assert status == 202, job
            ids.append(job["id"])
        wait_until(lambda: all(get(server, j)[2]["status"] == "succeeded" for j in ids), timeout=60,
                   what="jobs done")
        # more traffic while the backup runs: the snapshot is consistent, not torn
        writing = threading.Thread(target=lambda: [submit(server, prompt=f"during {i}")
                                                   for i in range(20)])
        writing.start()
        made = cli("backup", str(tmp_path / "backup"), "--config", str(server.config_path))
        writing.join()
        assert made.returncode == 0, made.stderr
        backed = json.loads((tmp_path / "backup" / "BACKUP.json").read_text())
        assert backed["jobs"].get("succeeded", 0) >= 20
        assert (tmp_path / "backup" / "secrets" / "admin.token").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()
    # a fresh host: the same config with an empty data directory
    fresh = dict(server.config, data_dir=str(tmp_path / "fresh"), admin_token_file=str(tmp_path / "fresh.token"))
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(fresh))
    restored = cli("restore", str(tmp_path / "backup"), "--config", str(tmp_path / "fresh.yaml"))
    assert restored.returncode == 0, restored.stderr
    assert "integrity ok" in restored.stdout
    second = Server(fresh, _mk(tmp_path / "b")).start()  # new ports, the restored data directory
    try:
        for job_id in ids:
            status, _, job = get(second, job_id)
            assert status == 200 and job["status"] == "succeeded" and job["result"]["choices"][0]["message"]["content"]
    finally:
        second.stop()


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_corrupted_backup_is_refused_by_name_and_nothing_changes(tmp_path):
    config = jobs_config(_mk(tmp_path / "a"))
    server = Server(config, tmp_path / "a")
    config_path = server.config_path
    made = cli("backup", str(tmp_path / "backup"), "--config", str(config_path))  # a stopped appliance, too
    assert made.returncode == 0, made.stderr
    token = tmp_path / "target.token"
    token.write_text("the token in place\n")
    target = dict(server.config, data_dir=str(tmp_path / "target"), admin_token_file=str(token))
    (tmp_path / "target.yaml").write_text(yaml.safe_dump(target))
    victim = next((tmp_path / "backup" / "config").iterdir())
    victim.write_text(victim.read_text() + "\n# altered\n")
    refused = cli("restore", str(tmp_path / "backup"), "--config", str(tmp_path / "target.yaml"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert str(victim) in refused.stderr and "checksum mismatch" in refused.stderr
    assert token.read_text() == "the token in place\n"  # nothing changed
    assert not (tmp_path / "target" / "jobs.sqlite3").exists()
    (tmp_path / "backup" / "extra.txt").write_text("slipped in")
    victim.unlink()
    refused = cli("restore", str(tmp_path / "backup"), "--config", str(tmp_path / "target.yaml"))
    assert refused.returncode == 2 and "missing" in refused.stderr


def test_a_model_that_changed_since_the_backup_is_named(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = jobs_config(_mk(tmp_path / "a"))
    config["pools"][0].update(engine="transformers", model_path=str(model))
    server = Server(config, tmp_path / "a")
    made = cli("backup", str(tmp_path / "backup"), "--config", str(server.config_path))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "backup" / "models" / config["pools"][0]["name"] / "fullpower-manifest.json").is_file()
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    refused = cli("restore", str(tmp_path / "backup"), "--config", str(server.config_path))
    assert refused.returncode == 2 and str(weights) in refused.stderr, refused.stderr


def test_the_recovery_drill_runs_end_to_end_on_the_embedded_model(tmp_path, embedded_model):
    import os
    import re
    import signal
    import sys

    config = yaml.safe_load((ROOT / "config/fullpower.yaml").read_text())
    config["pools"][0]["model_path"] = str(embedded_model)
    server = Server(config, _mk(tmp_path / "a")).start(timeout=300)
    restarted = None
    try:
        made = cli("backup", str(tmp_path / "backup"), "--config", str(server.config_path))
        assert made.returncode == 0, made.stderr
        drill = subprocess.run([sys.executable, "-m", "loadtest.drill", "--config", str(server.config_path),
                                "--backup", str(tmp_path / "backup"), "--pid", str(server.proc.pid),
                                "--requests", "10", "--log", str(tmp_path / "drill.log")],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        found = re.search(r"server running as pid (\d+)", drill.stdout)
        restarted = int(found.group(1)) if found else None
        assert drill.returncode == 0, drill.stdout + drill.stderr
        assert drill.stdout.count("PASS") == 5 and "10/10 succeeded" in drill.stdout
        assert "every file matches" in drill.stdout and "integrity ok" in drill.stdout
    finally:
        if server.proc.poll() is None:
            server.stop()
        if restarted is not None:
            os.kill(restarted, signal.SIGTERM)
            wait_until(lambda: not os.path.exists(f"/proc/{restarted}") or
                       open(f"/proc/{restarted}/stat").read().split()[2] == "Z", timeout=60, what="drill server gone")


def test_postgresql_job_store_backup_while_serving_and_restore_into_a_fresh_database(tmp_path):
    from tests.fleet import Database

    source, target = Database(), Database()
    try:
        config = jobs_config(_mk(tmp_path / "a"))
        config["jobs"] = {**config.get("jobs", {}), "store": "postgresql", "dsn": source.dsn}
        config["jobs"].pop("db_path", None)
        server = Server(config, tmp_path / "a").start()
        try:
            ids = [submit(server, prompt=f"pg {i}")[2]["id"] for i in range(10)]
            wait_until(lambda: all(get(server, j)[2]["status"] == "succeeded" for j in ids), timeout=60,
                       what="jobs done")
            writing = threading.Thread(target=lambda: [submit(server, prompt=f"during {i}") for i in range(10)])
            writing.start()
            made = cli("backup", str(tmp_path / "backup"), "--config", str(server.config_path))
            writing.join()
            assert made.returncode == 0, made.stderr
        finally:
            server.stop()
        backed = json.loads((tmp_path / "backup" / "BACKUP.json").read_text())
        assert "jobs.pgdump" in backed["files"] and sum(backed["jobs"].values()) >= 10
        # Restore into another (empty) database, then serve from it.
        fresh = dict(server.config, jobs={**config["jobs"], "dsn": target.dsn}, data_dir=str(tmp_path / "fresh"),
                     admin_token_file=str(tmp_path / "fresh.token"))
        (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(fresh))
        restored = cli("restore", str(tmp_path / "backup"), "--config", str(tmp_path / "fresh.yaml"))
        assert restored.returncode == 0, restored.stderr
        assert "as in the backup" in restored.stdout
        second = Server(fresh, _mk(tmp_path / "b")).start()
        try:
            for job_id in ids:
                status, _, job = get(second, job_id)
                assert status == 200 and job["status"] == "succeeded" and job["result"]["choices"]
        finally:
            second.stop()
        # A PostgreSQL backup is refused by a host that stores jobs in SQLite, naming why.
        sqlite_host = dict(fresh, jobs={k: v for k, v in config["jobs"].items() if k not in ("store", "dsn")})
        (tmp_path / "sqlite.yaml").write_text(yaml.safe_dump(sqlite_host))
        refused = cli("restore", str(tmp_path / "backup"), "--config", str(tmp_path / "sqlite.yaml"))
        assert refused.returncode != 0 and "job store is PostgreSQL" in refused.stderr
    finally:
        source.drop()
        target.drop()
