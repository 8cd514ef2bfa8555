"""The streaming token path: a client slower than the worker gets its pending deltas merged into
fewer events, and still receives exactly the same text and token counts."""

import asyncio
import json
import socket
import time

import pytest

from backend import protocol
from backend.protocol import Finished, Generate, SamplingParams, TokenBatch, Tokens
from proxy.fleet.worker_client import WorkerConnection
from tests.conftest import RecordingTransport, fake_config, http_json, metric_value, wait_until
from tests.test_request_path import KEYS, body, read_stream, stream_text


def _slow_read(port: int, payload: dict, key: str, pause, keep_alive: bool = False) -> list[dict]:
    """A streaming request whose client stops reading after the first bytes until `pause()`
    returns: the sockets' buffers fill (a small receive buffer keeps them small), and the deltas
    the worker makes meanwhile pile up behind them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", port))
    raw = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Cache-Control: no-cache, no-store\r\n" + (b"" if keep_alive else b"Connection: close\r\n")
                 + f"Authorization: {key}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    data = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        if not data:
            pause()
        data += chunk
        if keep_alive and data.endswith(b"\r\n0\r\n\r\n"):
            break  # the last chunk: the connection stays open for the next request
    sock.close()
    head, _, chunked = data.partition(b"\r\n\r\n")
    body_bytes, rest = b"", chunked
    while rest:  # undo the chunked transfer encoding
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body_bytes, rest = body_bytes + rest[:size], rest[size + 2:]
    events = [block[6:] for block in body_bytes.decode().split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("cache,keep_alive", [(True, False), (False, False), (False, True)],
                         ids=["shared-flight", "direct-path", "direct-path-fast-lane"])
def test_a_slow_client_gets_merged_deltas_with_the_exact_text_and_token_counts(start_server, cache, keep_alive):
    """With the cache on, the answer comes through a shared flight; with it off, through the
    request's own generation and the direct path (tokens written from the worker connection).
    `Connection: close` sends the request to aiohttp; a keep-alive one is served by the fast lane."""
    tokens = 100_000  # about 14 MB of events: far more than the sockets' buffers hold
    config = fake_config(fake={"token_latency_ms": 0, "output_tokens": tokens, "context_length": tokens + 100})
    config["cache"] = {"enabled": cache}
    server = start_server(config)
    payload = body("the same long answer", stream=True, temperature=0, max_tokens=tokens,
                   stream_options={"include_usage": True})
    fast = read_stream(server.url, payload, KEYS["standard"], headers={"Cache-Control": "no-cache, no-store"})
    # the client reads again only once the worker has generated everything
    def worker_done():
        wait_until(lambda: metric_value(http_json(server.admin + "/metrics")[2],
                                        "fullpower_worker_generated_tokens_total") >= 2 * tokens,
                   timeout=60, interval=0.05, what="the worker finished generating")

    slow = _slow_read(server.port, payload, KEYS["standard"], worker_done, keep_alive)
    slow_text = "".join(e["choices"][0]["delta"].get("content") or "" for e in slow if e["choices"])
    assert slow_text == stream_text(fast)
    usage = slow[-1]["usage"]
    assert usage["completion_tokens"] == tokens and slow[-2]["choices"][0]["finish_reason"] == "length"
    deltas = [e for e in slow if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(deltas) < tokens, len(deltas)  # merged: fewer events than tokens
    assert all(e["usage"] is None for e in slow[:-1])  # include_usage shape kept on merged events


def test_plain_answers_collected_on_the_direct_path_have_the_streamed_text_exactly(start_server):
    """A non-streaming answer takes its tokens' text on the direct path after the first ones (its
    task wakes for the end, not per step), while tokens that arrive when the task is awake queue as
    frames: with several long answers at once both happen many times, and each answer must still be
    its streamed twin's text, in order, with the same token count."""
    import concurrent.futures

    tokens = 3000
    config = fake_config(fake={"token_latency_ms": 0, "output_tokens": tokens, "context_length": tokens + 100})
    config["cache"] = {"enabled": False}
    server = start_server(config)
    prompts = [f"plain answer number {i} " + "word " * i for i in range(8)]

    def plain(prompt):
        status, _, got = http_json(server.url + "/v1/chat/completions",
                                   body(prompt, temperature=0, max_tokens=tokens),
                                   headers={"Authorization": KEYS["standard"]}, timeout=60)
        assert status == 200, got
        return got

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(plain, prompts))
    for prompt, got in zip(prompts, answers):
        streamed = read_stream(server.url, body(prompt, stream=True, temperature=0, max_tokens=tokens),
                               KEYS["standard"])
        assert got["choices"][0]["message"]["content"] == stream_text(streamed)
        assert got["usage"]["completion_tokens"] == tokens and got["choices"][0]["finish_reason"] == "length"


def test_a_streams_last_tokens_wait_for_its_end_and_other_streams_take_the_direct_path():
    """One read from a worker carrying a step's TokenBatch and the end (Finished) of one of its
    streams: the ending stream's last tokens queue for its consumer, which then takes them with
    the end in one wake-up (one write to its client); the stream that goes on hands its token to
    its direct sink."""
    async def scenario():
        conn = WorkerConnection(lambda msg: None)
        conn.connection_made(RecordingTransport())
        streams = {rid: conn.generate(Generate(id=rid, params=SamplingParams(), prompt="hi")) for rid in (1, 2)}
        sunk = {1: [], 2: []}
        for rid, stream in streams.items():
            stream.sink = lambda text, ids, rid=rid: sunk[rid].append((text, ids)) is None
        loop = asyncio.get_running_loop()
        waiters = {rid: asyncio.create_task(s.wait_until(loop.time() + 30)) for rid, s in streams.items()}
        await asyncio.sleep(0)  # both consumers parked

        conn.data_received(protocol.encode_many([
            TokenBatch(ids=[1, 2], token_ids=[[7, 8], [9]], texts=["ab", "c"]),
            Finished(id=1, finish_reason="length", prompt_tokens=3, completion_tokens=4)]))
        assert sunk == {1: [], 2: [("c", [9])]}
        await asyncio.wait_for(waiters[1], 5)  # the ending stream's consumer woke, once, for both
        assert streams[1].take() == [Tokens(id=1, token_ids=[7, 8], text="ab"),
                                    Finished(id=1, finish_reason="length", prompt_tokens=3, completion_tokens=4)]
        assert not waiters[2].done() and streams[2].take() == []

        # a read without an end: every parked stream takes the direct path
        conn.data_received(protocol.encode_many([TokenBatch(ids=[2], token_ids=[[10]], texts=["d"])]))
        assert sunk[2] == [("c", [9]), ("d", [10])]
        waiters[2].cancel()
        for stream in streams.values():
            stream.release()

    asyncio.run(scenario())
