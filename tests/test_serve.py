"""`fullpower serve` as a real process with fake-engine workers: the minimal OpenAI path, health,
admin, errors, and a clean stop."""

import json
import signal
import subprocess
import time
import urllib.request

from tests.conftest import FULLPOWER, ROOT, fake_config, http_json, process_alive

PREMIUM = {"Authorization": "Bearer sk-test-premium"}


def chat(server, body, headers=PREMIUM):
    return http_json(server.url + "/v1/chat/completions", body, headers)


def sse_events(server, path, body, headers=PREMIUM):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(block[len("data: "):]) for block in raw.split("\n\n")
            if block.startswith("data: ") and block != "data: [DONE]"]


def test_chat_completion_non_streaming(fake_server):
    status, headers, body = chat(fake_server, {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 5})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["total_tokens"] > 5
    assert len(body["choices"][0]["message"]["content"].split()) == 5
    assert headers["X-Fullpower-Backend"] in {"main-0", "main-1"}
    assert headers["X-Fullpower-Model"] == "fake-model"
    assert headers["X-Request-Id"]


def test_streaming_chat_and_completions(fake_server):
    events = sse_events(fake_server, "/v1/chat/completions",
                        {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                         "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert len(content) == 16 and all(content)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 17

    events = sse_events(fake_server, "/v1/completions", {"model": "fake-model", "prompt": "a b c", "stream": True,
                                                        "max_tokens": 3})
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_deterministic_text_for_the_same_prompt(fake_server):
    body = {"model": "fake-model", "prompt": "same prompt", "max_tokens": 8, "temperature": 0}
    texts = {http_json(fake_server.url + "/v1/completions", body, PREMIUM)[2]["choices"][0]["text"] for _ in range(4)}
    assert len(texts) == 1


def test_models_health_ready_and_admin(fake_server):
    status, _, body = http_json(fake_server.url + "/v1/models", headers=PREMIUM)
    assert status == 200 and [m["id"] for m in body["data"]] == ["fake-model"]
    assert http_json(fake_server.url + "/healthz")[0] == 200
    assert http_json(fake_server.url + "/readyz")[0] == 200
    workers = fake_server.pool()
    assert {w["id"] for w in workers} == {"main-0", "main-1"}
    assert all(w["state"] == "ready" and w["pid"] and w["restarts"] == 0 for w in workers)


def test_errors_use_openai_shape(fake_server):
    cases = [
        (chat(fake_server, b"{not json"), 400, None),
        (chat(fake_server, {"model": "fake-model", "messages": []}), 400, "messages"),
        (chat(fake_server, {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
         400, "temperature"),
        (chat(fake_server, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "model"),
        (chat(fake_server, {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
              {"Authorization": "Bearer sk-wrong-key"}), 401, None),
        (http_json(fake_server.url + "/v1/nothing-here", {}, PREMIUM), 404, None),
    ]
    for (status, headers, body), want_status, want_param in cases:
        assert status == want_status, body
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
        assert want_param is None or body["error"]["param"] == want_param, body
        assert "Traceback" not in json.dumps(body)
        assert headers["X-Request-Id"]


def test_sigterm_leaves_no_worker_process(start_server):
    server = start_server(fake_config())
    pids = server.worker_pids()
    assert len(pids) == 2 and all(process_alive(p) for p in pids)
    assert server.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in pids)


def test_sigkilled_proxy_takes_its_workers_along_with_no_orphan_timeout(start_server):
    config = fake_config()
    config["workers"]["orphan_timeout_s"] = 0  # workers die with the proxy (PR_SET_PDEATHSIG)
    server = start_server(config)
    pids = server.worker_pids()
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in pids)


def test_worker_that_fails_at_boot_backs_off_and_reports(start_server):
    server = start_server(fake_config(fake={"boot_fail": "no GPU here"}), wait_ready=False)
    deadline = time.monotonic() + 30
    workers = []
    while time.monotonic() < deadline:
        try:
            workers = server.pool()
        except OSError:
            workers = []
        if workers and all(w["boot_failures"] >= 2 for w in workers):
            break
        time.sleep(0.2)
    assert workers and all(w["boot_failures"] >= 2 for w in workers), workers
    assert all("no GPU here" in (w["last_error"] or "") for w in workers)
    assert http_json(server.url + "/readyz")[0] == 503
    status, headers, body = chat(server, {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and headers["Retry-After"]
    assert server.proc.poll() is None  # the proxy itself keeps running


def test_status_command_prints_the_pool(fake_server):
    table = subprocess.run(FULLPOWER + ["status", "--config", str(fake_server.config_path)], capture_output=True,
                           text=True, cwd=ROOT, timeout=30)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "PID", "DEVICE", "MODEL", "STATE"]
    assert any(l.startswith("main-0") and "ready" in l for l in lines)
    js = subprocess.run(FULLPOWER + ["status", "--json", "--admin", f"127.0.0.1:{fake_server.admin_port}",
                         "--admin-token-file", fake_server.config["admin_token_file"]],
                        capture_output=True, text=True, cwd=ROOT, timeout=30)
    data = json.loads(js.stdout)
    assert {w["id"] for w in data["workers"]} == {"main-0", "main-1"}
    assert all({"pid", "device", "model", "state", "inflight", "restarts"} <= set(w) for w in data["workers"])


def test_a_pool_with_a_stream_interval_streams_tokens_a_few_at_a_time(start_server):
    """stream_interval: 4 (the pool's setting, passed to its workers): the first token's event at
    once, then one event per four tokens, the last group with the end - the same text and usage as
    the plain answer."""
    server = start_server(fake_config(stream_interval=4))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    status, _, plain = chat(server, body)
    assert status == 200, plain
    events = sse_events(server, "/v1/chat/completions",
                        {**body, "stream": True, "stream_options": {"include_usage": True}})
    content = [e["choices"][0]["delta"].get("content") for e in events if e["choices"] and
               e["choices"][0]["delta"].get("content")]
    # 16 words and the end of sequence: 1 at once, then 4 + 4 + 4, then 3 words with the end
    assert len(content) == 5
    assert "".join(content) == plain["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 17
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] == ["stop"]
