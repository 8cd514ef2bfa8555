"""/metrics parses with prometheus-client's parser, and the counters move as traffic says."""

import os
import shutil
import signal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.protocol import HOST_PARTS
from tests.conftest import ROOT, fake_config, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body, read_stream


def scrape(server) -> str:
    status, headers, text = http_json(server.admin + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return text


def test_metrics_parse_and_move(start_server):
    config = fake_config(max_inflight_per_worker=1, max_batch_size=1, fake={"token_latency_ms": 30, "output_tokens": 8})
    for tier in config["tiers"]:
        tier.update(max_queue=0)
    server = start_server(config)
    families = {f.name for f in text_string_to_metric_families(scrape(server))}
    for name in ("fullpower_requests", "fullpower_request_duration_seconds", "fullpower_queue_wait_seconds",
                 "fullpower_time_to_first_token_seconds", "fullpower_inter_token_seconds",
                 "fullpower_proxy_overhead_seconds", "fullpower_queue_depth", "fullpower_inflight_requests",
                 "fullpower_worker_state", "fullpower_worker_inflight", "fullpower_worker_restarts",
                 "fullpower_worker_breaker_state", "fullpower_worker_heartbeat_age_seconds", "fullpower_tokens",
                 "fullpower_retries", "fullpower_stream_resumes", "fullpower_config_reloads",
                 "fullpower_worker_batch_size", "fullpower_worker_kv_slots", "fullpower_worker_memory_bytes",
                 "fullpower_worker_gpu_memory_bytes", "process_cpu_seconds"):
        assert name in families, name

    # served: one stream (TTFT, inter-token) and one plain request
    read_stream(server.url, body("m", stream=True), KEYS["premium"])
    assert http_json(server.url + "/v1/chat/completions", body("n"), {"Authorization": KEYS["premium"]})[0] == 200
    # shed: both workers busy with long streams, no queue -> 429
    import threading
    holders = [threading.Thread(target=read_stream, args=(server.url, body(f"h{i}", stream=True, max_tokens=30),
                                                          KEYS["batch"])) for i in range(2)]
    for t in holders:
        t.start()
    wait_until(lambda: sum(w["inflight"] for w in server.pool()) == 2, what="both workers busy")
    assert http_json(server.url + "/v1/chat/completions", body("x"), {"Authorization": KEYS["standard"]})[0] == 429
    for t in holders:
        t.join(30)
    # a killed worker counts as a restart
    os.kill(server.pool()[0]["pid"], signal.SIGKILL)
    wait_until(lambda: server.pool()[0]["restarts"] == 1 and server.pool()[0]["state"] == "ready", what="restarted")

    text = scrape(server)
    assert metric_value(text, "fullpower_requests_total", tier="premium", outcome="served", status="200") == 2
    assert metric_value(text, "fullpower_requests_total", tier="standard", outcome="shed", status="429") == 1
    assert metric_value(text, "fullpower_request_duration_seconds_count", tier="premium") == 2
    assert metric_value(text, "fullpower_time_to_first_token_seconds_count", tier="premium") == 2
    assert metric_value(text, "fullpower_inter_token_seconds_count", tier="premium") >= 7
    assert metric_value(text, "fullpower_tokens_total", tier="premium", kind="completion") == 18  # (8 + EOS) x 2
    assert metric_value(text, "fullpower_worker_restarts_total", worker="main-0") == 1
    assert metric_value(text, "fullpower_worker_state", worker="main-0", state="ready") == 1
    # the workers' own figures come through the proxy: KV slots, process memory, tokens generated
    assert metric_value(text, "fullpower_worker_kv_slots", worker="main-1") == 1
    assert metric_value(text, "fullpower_worker_memory_bytes", worker="main-1") > 10 << 20
    assert metric_value(text, "fullpower_worker_generated_tokens_total", worker="main-1") > 0
    # and where its engine loop's host time went (the parts are a fixed label set)
    assert metric_value(text, "fullpower_worker_decode_steps_total", worker="main-1") > 0
    assert metric_value(text, "fullpower_worker_host_seconds_total", worker="main-1", part="advance") > 0
    assert sorted({line.split('part="')[1].split('"')[0] for line in text.splitlines()
                   if line.startswith("fullpower_worker_host_seconds_total{")}) == sorted(HOST_PARTS)
    # label values stay bounded: no request ids or key secrets anywhere
    assert "sk-test" not in text and "chatcmpl-" not in text


def test_the_served_step_anatomy_comes_from_two_scrapes(start_server):
    """loadtest.served_anatomy: each worker's engine-loop host time per decode step by part, from
    the heartbeat-carried counters scraped before and after some traffic."""
    from loadtest.served_anatomy import anatomy

    server = start_server(fake_config(fake={"token_latency_ms": 1, "output_tokens": 8}))
    before = scrape(server)
    for i in range(3):
        read_stream(server.url, body(f"anatomy {i}", stream=True), KEYS["premium"])
    found = {}

    def reported() -> bool:
        found.update(anatomy(before, scrape(server)))
        return any(w["decode_steps"] > 0 for w in found.values())
    wait_until(reported, what="a heartbeat reporting the decode steps")
    worker = next(w for w in found.values() if w["decode_steps"] > 0)
    assert sorted(worker["per_step_ms"]) == sorted(HOST_PARTS)
    assert worker["per_step_ms"]["advance"] > 0 and all(ms >= 0 for ms in worker["per_step_ms"].values())


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="promtool is not installed")
def test_alert_rules_pass_promtool():
    result = subprocess.run([PROMTOOL or "promtool", "check", "rules", str(ROOT / "config/prometheus/fullpower-alerts.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_alert_rules_name_metrics_that_exist():
    import re
    rules = (ROOT / "config/prometheus/fullpower-alerts.yml").read_text()
    dashboard = (ROOT / "config/grafana/fullpower-dashboard.json").read_text()
    source = "".join(p.read_text() for p in (ROOT / "proxy").glob("*.py"))
    for name in set(re.findall(r"fullpower_[a-z_]+", rules + dashboard)):
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in source, name


def test_loop_counters_expose_what_prometheus_clients_counters_do():
    """The request path's lock-free counters render exactly as prometheus-client's Counter (values,
    names, types), so dashboards and alerts cannot tell them apart."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from proxy.metrics import LoopCounter

    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Counter("x_requests", "Requests", ["tier"], registry=theirs_registry)
    ours = LoopCounter("x_requests", "Requests", ["tier"], registry=ours_registry)
    plain_theirs = Counter("x_plain", "Plain", registry=theirs_registry)
    plain_ours = LoopCounter("x_plain", "Plain", registry=ours_registry)
    for counter, plain in ((theirs, plain_theirs), (ours, plain_ours)):
        counter.labels("premium").inc()
        counter.labels("premium").inc(2.5)
        counter.labels("batch").inc()
        plain.inc(3)

    def samples(registry):
        return sorted((f.name, f.type, s.name, tuple(sorted(s.labels.items())), s.value)
                      for f in text_string_to_metric_families(generate_latest(registry).decode())
                      for s in f.samples if not s.name.endswith("_created"))

    assert samples(ours_registry) == samples(theirs_registry)
    assert ("x_requests", "counter", "x_requests_total", (("tier", "premium"),), 3.5) in samples(ours_registry)
    with pytest.raises(ValueError):
        ours.labels("premium").inc(-1)
    with pytest.raises(ValueError):
        ours.labels("premium", "extra")
