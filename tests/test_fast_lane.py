"""The public listener's fast lane: plain OpenAI requests answered straight from the socket, every
other request handed to aiohttp with all its bytes, and the answers the same either way."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import RecordingTransport, fake_config, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body

# differ between any two answers (the names must still match)
VOLATILE = {"date", "x-request-id", "content-length", "x-fullpower-backend", "x-fullpower-overhead-ms"}


def raw_request(payload: bytes | dict, path: str = "/v1/chat/completions", headers: dict | None = None,
                key: str = KEYS["premium"]) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = {"Host": "x", "Content-Type": "application/json", "Authorization": key, "Content-Length": str(len(data)),
            **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
            + "\r\n").encode() + data


def read_response(reader) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response from a buffered socket reader: (status, lower-cased headers, body)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        data = reader.read(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked", headers
        data = b""
        while (size := int(reader.readline().strip(), 16)):
            data += reader.read(size)
            reader.readline()
        reader.readline()
    return int(status_line.split()[1]), headers, data


def served_on_lane(server) -> tuple[float, float]:
    _, _, text = http_json(server.admin + "/metrics")
    return (metric_value(text, "fullpower_fast_lane_requests_total"),
            metric_value(text, "fullpower_fast_lane_handovers_total"))


@pytest.fixture
def server(start_server):
    return start_server(fake_config(fake={"output_tokens": 6}))


def test_pipelined_requests_are_answered_in_order_and_another_endpoint_moves_the_connection_to_aiohttp(server):
    before = served_on_lane(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    reader = sock.makefile("rb")
    # Four requests in one write: a plain one and a stream (both on the lane), a model listing
    # (handed to aiohttp with its bytes and everything after it), and a plain one aiohttp now serves.
    sock.sendall(raw_request(body("one", max_tokens=4)) + raw_request(body("two", stream=True, max_tokens=4))
                 + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + KEYS["premium"].encode() + b"\r\n\r\n"
                 + raw_request(body("four", max_tokens=4)))
    answers = [read_response(reader) for _ in range(4)]
    sock.close()
    for i in (0, 3):
        status, headers, data = answers[i]
        assert status == 200 and headers["content-type"].startswith("application/json"), answers[i]
        assert headers["server"] == "fullpower" and headers["x-request-id"] and "date" in headers
        assert json.loads(data)["choices"][0]["message"]["content"]
    status, headers, data = answers[1]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["server"] == "fullpower" and headers["x-request-id"]
    events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith(b"data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert data.rstrip().endswith(b"data: [DONE]")
    status, headers, data = answers[2]
    assert status == 200 and json.loads(data)["data"][0]["id"] == "fake-model"
    after = served_on_lane(server)
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1, (before, after)


REQUESTS = [  # (what, raw request bytes): each answered identically by the lane and by aiohttp
    ("plain", raw_request(body("same", max_tokens=4, temperature=0))),
    ("unknown key", raw_request(body("x"), key="Bearer sk-nobody")),
    ("unknown model", raw_request({**body("x"), "model": "nope"})),
    ("bad field", raw_request(body("x", max_tokens=-1))),
    ("not JSON", raw_request(b"{not json")),
    ("wrong content type", raw_request(body("x"), headers={"Content-Type": "text/plain"})),
    ("escaped stream key", raw_request(b'{"model":"fake-model","messages":[{"role":"user","content":"x"}],'
                                       b'"str\\u0065am":true,"max_tokens":3}')),
    ("bad priority", raw_request(body("x"), headers={"X-Priority": "platinum"})),
    ("completions", raw_request({"model": "fake-model", "prompt": "x", "max_tokens": 3}, path="/v1/completions")),
]


def _answers(port: int) -> list[tuple[int, dict, bytes]]:
    out = []
    for _, raw in REQUESTS:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(raw)
            out.append(read_response(sock.makefile("rb")))
    return out


def test_the_lane_answers_every_case_as_aiohttp_does(start_server, tmp_path):
    lane = start_server(fake_config(fake={"output_tokens": 6}))
    config = fake_config(fake={"output_tokens": 6})
    config["fast_lane"] = False
    config["data_dir"] = str(tmp_path / "plain")  # its own workers (the same data dir would adopt the first's)
    plain = start_server(config)
    for (what, _), a, b in zip(REQUESTS, _answers(lane.port), _answers(plain.port)):
        assert a[0] == b[0], (what, a, b)
        assert set(a[1]) == set(b[1]), (what, a[1], b[1])
        assert {k: v for k, v in a[1].items() if k not in VOLATILE} == \
               {k: v for k, v in b[1].items() if k not in VOLATILE}, what
        if a[1]["content-type"].startswith("application/json"):
            da, db = json.loads(a[2]), json.loads(b[2])
            if "error" in da:
                assert da == db, what
            else:
                assert da["object"] == db["object"] and da["usage"] == db["usage"], what
        else:
            assert a[2].count(b"data: ") == b[2].count(b"data: "), what
    assert served_on_lane(plain) == (0, 0)  # off means off


def test_a_slow_head_is_closed_and_a_slow_body_gets_aiohttps_timeout(start_server):
    config = fake_config()
    config["limits"] = {"header_timeout_s": 1.0, "body_timeout_s": 1.0}
    server = start_server(config)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 10
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        raw = raw_request(body("x"))
        sock.sendall(raw[:-5])  # the head and most of the body
        status, headers, data = read_response(sock.makefile("rb"))
        assert status == 408 and json.loads(data)["error"]["message"] == "The request body did not arrive in time."


def test_each_request_moves_the_idle_deadline_and_an_idle_connection_is_closed_after_it(start_server):
    """The keep-alive timeout counts from the last answer, not from the connection's start: requests
    spaced closer than the timeout keep a connection open well past it; idle, it is closed."""
    config = fake_config(fake={"output_tokens": 2})
    config["limits"] = {"header_timeout_s": 1.0}
    server = start_server(config)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # three timeouts' worth of a busy connection
            sock.sendall(raw_request(body("keep", max_tokens=2)))
            assert read_response(reader)[0] == 200
            time.sleep(0.3)
        idle_from = time.monotonic()
        assert sock.recv(100) == b""  # then closed by the server, once idle for the timeout
        assert 0.5 <= time.monotonic() - idle_from < 10


def test_a_client_that_leaves_cancels_its_generation(start_server):
    server = start_server(fake_config(fake={"token_latency_ms": 100, "output_tokens": 100}))

    def cancelled() -> float:
        _, _, text = http_json(server.admin + "/metrics")
        return metric_value(text, "fullpower_cancellations_total")

    before = cancelled()
    served_before = served_on_lane(server)[0]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(raw_request(body("long", max_tokens=100, temperature=1)))
    wait_until(lambda: sum(w["inflight"] for w in server.pool()) >= 1, timeout=30, what="the request in flight")
    sock.close()
    wait_until(lambda: cancelled() > before, timeout=30, what="the generation cancelled")
    assert served_on_lane(server)[0] == served_before  # nothing was answered


def test_a_body_in_several_reads_is_served_on_the_lane(server):
    before = served_on_lane(server)
    raw = raw_request(body("in pieces " * 200, max_tokens=4))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        for i in range(0, len(raw), 300):  # the head, then the body in pieces, each its own write
            sock.sendall(raw[i:i + 300])
            time.sleep(0.02)  # shapes the input into separate reads; nothing waits on it
        status, _, data = read_response(reader)
    assert status == 200 and json.loads(data)["choices"][0]["message"]["content"]
    after = served_on_lane(server)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0), (before, after)


def test_a_streams_head_leaves_with_its_first_events_and_its_last_chunk_with_the_end():
    """Writes of a stream on the lane: the head goes out with the first events (one send, not two),
    the last events with the body's end, and a second end writes nothing."""
    import asyncio

    from proxy.http.fast_lane import FastLaneConnection
    from proxy.http.fast_lane_request import LaneStreamResponse

    class Lane:  # what the connection asks of its lane for a head
        @staticmethod
        def status_line(status):
            return f"HTTP/1.1 {status} OK\r\nServer: test\r\n"

        @staticmethod
        def date_line():
            return "Date: today\r\n"

    conn = FastLaneConnection(Lane(), manager=None, make_handler=None)
    conn.transport = transport = RecordingTransport()

    async def stream():
        response = LaneStreamResponse(conn, {"Content-Type": "text/event-stream"})
        await response.prepare(None)
        assert transport.writes == []  # the head waits for the body's first write
        await response.write(b"data: a\n\n")
        await response.write_eof(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    response = asyncio.run(stream())
    assert response.finished
    assert len(transport.writes) == 2
    head, first = transport.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert first == b"9\r\ndata: a\n\n\r\n"
    assert transport.writes[1] == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
