"""The deployment files for several hosts, checked offline: the Kubernetes manifests against the
Kubernetes API schemas (kubernetes-validate), KEDA's objects against the fields KEDA documents,
the appliance config inside them with fullpower's own parser, the KEDA PostgreSQL trigger's query
against a real migrated job database, and the nginx fleet config with `nginx -t`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import parse_config
from tests.conftest import ROOT
from tests.fleet import NGINX, Database

K8S = ROOT / "deploy/kubernetes"


def documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate_against_the_api_schemas():
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, sorted(K8S.glob("*.yaml")))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {line.split("for resource ")[1].split("/")[0] for line in out.stdout.splitlines() if "passed" in line}
    assert {"deployment", "service", "secret", "poddisruptionbudget"} <= kinds, out.stdout


def test_keda_scales_the_deployment_on_queue_depth_and_queued_jobs_at_fifty():
    docs = documents()
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    scaled = by_kind[("ScaledObject", "fullpower")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    deployment = by_kind[("Deployment", spec["scaleTargetRef"]["name"])]
    assert spec["minReplicaCount"] == deployment["spec"]["replicas"] == 3 < spec["maxReplicaCount"]
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"prometheus", "postgresql"}
    prom = triggers["prometheus"]["metadata"]
    assert "fullpower_queue_depth" in prom["query"] and prom["threshold"] == "50"
    assert all(isinstance(v, str) for v in prom.values())  # KEDA's metadata values are strings
    pg = triggers["postgresql"]
    assert pg["metadata"]["targetQueryValue"] == "50"
    auth = by_kind[("TriggerAuthentication", pg["authenticationRef"]["name"])]
    ref = auth["spec"]["secretTargetRef"][0]
    assert ref["parameter"] == "connection" and ref["key"] in by_kind[("Secret", ref["name"])]["stringData"]
    # The queue-depth metric is one fullpower exports.
    collectors = (ROOT / "proxy/collectors.py").read_text()
    assert '"fullpower_queue_depth"' in collectors


def test_the_config_in_the_manifests_is_a_valid_fleet_config(tmp_path):
    secret = next(d for d in documents() if d["kind"] == "Secret" and d["metadata"]["name"] == "fullpower-config")
    text = secret["stringData"]["fullpower.yaml"]
    assert "model_path: /models/llama-3.1-8b-instruct" in text
    (tmp_path / "model").mkdir()  # the model volume exists only in the cluster: its config suffices
    (tmp_path / "model/config.json").write_text((ROOT / "loadtest/models/llama-3.1-8b/config.json").read_text())
    cfg = parse_config(text.replace("/models/llama-3.1-8b-instruct", str(tmp_path / "model")))
    assert cfg.jobs.store == "postgresql" and cfg.shared.redis_url.startswith("redis://")
    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(container["args"][-1]).parent) in mounts and str(Path(cfg.admin_token_file).parent) in mounts
    assert {p["containerPort"] for p in container["ports"]} == {8080, 9091}


def test_the_keda_job_query_runs_against_the_real_schema():
    import asyncio

    import asyncpg

    from proxy.jobs.pg_schema import migrate

    query = next(t for d in documents() if d["kind"] == "ScaledObject" for t in d["spec"]["triggers"]
                 if t["type"] == "postgresql")["metadata"]["query"]
    db = Database()
    try:
        async def run():
            conn = await asyncpg.connect(db.dsn)
            try:
                await migrate(conn)
                return await conn.fetchval(query)
            finally:
                await conn.close()
        assert asyncio.run(run()) == 0
    finally:
        db.drop()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_nginx_fleet_config_passes_nginx_t(tmp_path):
    from tests.fleet import start_fleet_nginx

    proc, _, _ = start_fleet_nginx(tmp_path, [1, 2, 3])  # runs `nginx -t` first
    proc.terminate()
    proc.wait(10)


def test_readyz_sync_marks_a_host_that_is_not_ready_down_and_back(fake_server, tmp_path):
    from tests.conftest import free_port

    dead = free_port()
    conf = tmp_path / "fleet.conf"
    conf.write_text(f"upstream f {{\n    server 127.0.0.1:{fake_server.port} max_fails=2 fail_timeout=5s down;\n"
                    f"    server 127.0.0.1:{dead} max_fails=2 fail_timeout=5s;\n}}\n")
    reloaded = tmp_path / "reloaded"
    script = ROOT / "deploy/nginx/readyz-sync"
    subprocess.run([str(script), str(conf), "touch", str(reloaded)], check=True, timeout=30)
    lines = conf.read_text().splitlines()
    assert lines[1].endswith("fail_timeout=5s;") and lines[2].endswith("fail_timeout=5s down;")
    assert reloaded.exists()
    reloaded.unlink()
    subprocess.run([str(script), str(conf), "touch", str(reloaded)], check=True, timeout=30)
    assert not reloaded.exists()  # nothing changed: no reload
