"""Hostile and malformed input gets its status code, and the server keeps serving everyone else."""

import json
import socket
import time

import pytest

from tests.conftest import fake_config, http_json

KEY = "Bearer sk-test-standard"
GOOD = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import Server

    config = fake_config(fake={"token_latency_ms": 0})
    config["limits"] = {"max_body_bytes": 4096, "header_timeout_s": 1.5, "body_timeout_s": 1.0,
                        "max_header_count": 30, "max_header_bytes": 2048}
    s = Server(config, tmp_path_factory.mktemp("hostile")).start()
    yield s
    s.stop()


def raw(server, data: bytes, read_timeout: float = 10.0, pause_after: bytes | None = None) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and b"Content-Length: " in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    break
        return out


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]
    return int(response.split(b" ", 2)[1])


def request(body: bytes = GOOD, headers: dict | None = None, path: str = "/v1/chat/completions") -> bytes:
    h = {"Host": "x", "Content-Type": "application/json", "Authorization": KEY, "Content-Length": str(len(body)),
         "Connection": "close", **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def assert_still_serving(server):
    assert status_of(raw(server, request())) == 200


CASES = {
    "body over the limit (Content-Length)": (request(b"x" * 5000), 413),
    "body over the limit (chunked)": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: " +
        KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"x" * 4096 + b"\r\n") * 3 +
        b"0\r\n\r\n", 413),
    "Content-Length with Transfer-Encoding": (
        request(headers={"Transfer-Encoding": "chunked"}), 400),
    "duplicate Content-Length": (
        request().replace(b"Connection: close\r\n", b"Content-Length: 5\r\nConnection: close\r\n"), 400),
    "bare LF line endings": (request().replace(b"\r\n", b"\n"), 400),
    "obs-fold header continuation": (
        request().replace(b"Connection: close\r\n", b"X-Folded: a\r\n b\r\nConnection: close\r\n"), 400),
    "too many headers": (request(headers={f"X-H{i}": "v" for i in range(40)}), 431),
    "header line too long": (request(headers={"X-Big": "v" * 4000}), 431),
    "malformed JSON": (request(b'{"model": "fake-model", "messages": ['), 400),
    "invalid UTF-8": (request(b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400),
    "wrong content type": (request(headers={"Content-Type": "text/plain"}), 415),
    "absurd max_tokens": (request(json.dumps({"model": "fake-model", "max_tokens": 10**30,
                                              "messages": [{"role": "user", "content": "x"}]}).encode()), 400),
    "NaN temperature": (request(b'{"model": "fake-model", "temperature": NaN, "messages": []}'), 400),
    "negative top_p": (request(json.dumps({"model": "fake-model", "top_p": -1,
                                           "messages": [{"role": "user", "content": "x"}]}).encode()), 400),
    "wrong type for messages": (request(json.dumps({"model": "fake-model", "messages": "hi"}).encode()), 400),
    "unknown path": (request(path="/v1/engines/davinci"), 404),
    "wrong method": (b"DELETE /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    "JSON that is not an object": (request(b"[1, 2, 3]"), 400),
}


@pytest.mark.parametrize("keep_alive", [False, True], ids=["close", "keep-alive"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_gets_its_status(server, case, keep_alive):
    """With `Connection: close` a request goes to aiohttp; on a keep-alive connection it reaches
    the fast lane first (proxy/http/fast_lane.py), which must answer or hand it over the same."""
    data, expected = CASES[case]
    if keep_alive:
        data = data.replace(b"Connection: close\r\n", b"").replace(b"Connection: close\n", b"")
    response = raw(server, data)
    assert status_of(response) in ((400, 431) if expected == 431 else (expected,)), response[:300]
    assert b"Traceback" not in response
    assert_still_serving(server)


def test_error_bodies_are_openai_shaped_with_request_id(server):
    response = raw(server, request(b"{broken"))
    head, _, body = response.partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert b"X-Request-Id: " in head


def test_hop_by_hop_headers_are_harmless(server):
    response = raw(server, request(headers={"Connection": "close, X-Secret", "X-Secret": "s", "Keep-Alive": "300",
                                            "TE": "trailers", "Upgrade": "h2c", "Proxy-Connection": "keep-alive",
                                            "Proxy-Authorization": "Basic Zm9vOmJhcg==", "Trailer": "X-T"}))
    # Nothing of the HTTP request reaches a worker but the parsed body: the worker protocol carries
    # only Generate frames. The request is served normally.
    assert status_of(response) == 200


def test_slow_headers_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8:
            sock.sendall(b"X-Slow: 1\r\n")  # a slowloris trickle
            time.sleep(0.3)
            try:
                sock.settimeout(0.01)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        assert closed
    assert_still_serving(server)


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        data = request()
        head, _, body = data.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n" + body[:10])
        response = sock.recv(65536)
    assert status_of(response) == 408
    assert_still_serving(server)


def test_forwarded_for_is_ignored_from_untrusted_peers(server):
    status, _, _ = http_json(server.url + "/v1/chat/completions", json.loads(GOOD),
                             {"Authorization": KEY, "X-Forwarded-For": "203.0.113.9", "X-Request-Id": "xff-check-1"})
    assert status == 200
    line = next(l for l in server.log().splitlines() if '"xff-check-1"' in l)
    assert '"client":"127.0.0.1"' in line


def test_forwarded_for_is_used_from_trusted_proxies(start_server):
    config = fake_config(fake={"token_latency_ms": 0})
    config["limits"] = {"trusted_proxies": ["127.0.0.0/8"]}
    server = start_server(config)
    http_json(server.url + "/v1/chat/completions", json.loads(GOOD),
              {"Authorization": KEY, "X-Forwarded-For": "198.51.100.7, 127.0.0.5", "X-Request-Id": "xff-check-2"})
    line = next(l for l in server.log().splitlines() if '"xff-check-2"' in l)
    assert '"client":"198.51.100.7"' in line
