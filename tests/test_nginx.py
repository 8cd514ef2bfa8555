"""Streaming and non-streaming requests through a real nginx using the shipped
systemd/nginx-fullpower.conf, including a stream longer than nginx's default 60 s read timeout."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from loadtest.nginx import nginx_prefix
from tests.conftest import ROOT, fake_config, free_port, http_json, wait_until
from tests.test_request_path import KEYS, body, read_stream, stream_text

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None and not os.environ.get("CI"), reason="nginx is not installed")


def start_nginx(tmp_path, upstream_port):
    port = free_port()
    site = (ROOT / "systemd/nginx-fullpower.conf").read_text()
    site = site.replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}").replace("listen 80;",
                                                                                f"listen 127.0.0.1:{port};")
    conf = nginx_prefix(tmp_path, "fullpower.conf", site, worker_connections=256)
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"])
    wait_until(lambda: _open(port), what="nginx listening")
    return proc, f"http://127.0.0.1:{port}"


def _open(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def behind_nginx(start_server, tmp_path, request):
    fake = getattr(request, "param", {"token_latency_ms": 5, "output_tokens": 20})
    config = fake_config(fake=fake)
    config["limits"] = {"trusted_proxies": ["127.0.0.1"]}
    server = start_server(config)
    proc, url = start_nginx(tmp_path, server.port)
    yield server, url
    proc.terminate()
    proc.wait(10)


def test_non_streaming_and_streaming_through_nginx(behind_nginx):
    server, url = behind_nginx
    status, headers, payload = http_json(url + "/v1/chat/completions", body(max_tokens=5),
                                         {"Authorization": KEYS["premium"], "X-Request-Id": "through-nginx-1"})
    assert status == 200 and payload["usage"]["completion_tokens"] == 5
    assert headers["X-Request-Id"] == "through-nginx-1" and headers["X-Fullpower-Backend"]
    direct = stream_text(read_stream(server.url, body("same", stream=True, temperature=0), KEYS["premium"]))
    events = read_stream(url, body("same", stream=True, temperature=0), KEYS["premium"])
    assert events[-1] == "[DONE]" and stream_text(events) == direct
    # errors and overload pass through unchanged
    status, headers, payload = http_json(url + "/v1/chat/completions", body(), {"Authorization": "Bearer sk-no-such"})
    assert status == 401 and payload["error"]["code"] == "invalid_api_key"


def test_stream_events_arrive_as_they_are_generated(behind_nginx):
    _, url = behind_nginx
    req = urllib.request.Request(url + "/v1/chat/completions",
                                 data=json.dumps(body(stream=True, max_tokens=3)).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": KEYS["premium"]})
    with urllib.request.urlopen(req, timeout=30) as resp:
        first = resp.read1(65536)  # nginx must not hold the first events back until the end
        assert first.startswith(b"data: ")
        rest = resp.read()
    assert (first + rest).endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("behind_nginx", [{"token_latency_ms": 22000, "output_tokens": 3}], indirect=True)
def test_stream_longer_than_nginx_default_read_timeout(behind_nginx):
    """Three gaps of 22 s (66 s in all): past nginx's 60 s default proxy_read_timeout."""
    _, url = behind_nginx
    started = time.monotonic()
    events = read_stream(url, body(stream=True), KEYS["premium"])
    assert time.monotonic() - started > 60
    assert events[-1] == "[DONE]" and len(stream_text(events).split()) == 3
