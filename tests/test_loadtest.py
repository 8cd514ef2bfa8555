"""A few seconds of `fullpower loadtest` against bench-fake.yaml: it runs, and writes its JSON,
Markdown and PNG reports (a smoke run: no timing assertions)."""

import json
import subprocess

from tests.conftest import FULLPOWER, ROOT, fake_config


def test_loadtest_smoke_with_chaos(start_server, tmp_path):
    server = start_server(fake_config(devices=["cpu", "cpu", "cpu"], replicas={"hot": 3},
                                      fake={"token_latency_ms": 1, "output_tokens": 16}))
    out = tmp_path / "reports"
    result = subprocess.run(FULLPOWER + [
        "loadtest", "--url", server.url, "--admin-url", server.admin,
        "--admin-token-file", server.config["admin_token_file"], "--rate", "40", "--duration", "4",
        "--tiers", "premium=sk-test-premium:0.2,standard=sk-test-standard:0.5,batch=sk-test-batch:0.3",
        "--stream-share", "0.5", "--duplicate-share", "0.2", "--chaos-every", "1.5", "--max-tokens", "4-12",
        "--out", str(out), "--name", "smoke", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "smoke.json").read_text())
    assert summary["overall"]["requests"] >= 50
    assert summary["overall"]["succeeded"] >= 1
    assert set(summary["per_tier"]) == {"premium", "standard", "batch"}
    assert len(summary["chaos_events"]) >= 1
    assert "| all |" in (out / "smoke.md").read_text()
    for png in ("smoke-latency.png", "smoke-cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadtest_refuses_non_loopback_targets(tmp_path):
    result = subprocess.run([*FULLPOWER, "loadtest", "--url", "http://10.0.0.1:8080", "--duration", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "loopback" in result.stderr
