"""Socket writes the proxy makes per streaming request, counted by strace (Linux, strace installed).

    python -m loadtest.count_sends [--requests 200] [--tokens 8] [--stream-interval 1]

Starts `fullpower serve` from this checkout with one fake worker (cache off), sends one streaming
chat request to warm up, then counts the proxy process's write/sendto/sendmsg/writev system calls
(`strace -c`) over --requests sequential streaming requests on one keep-alive connection (so the
fast lane serves them). Each send is a system call and, on loopback, the wake-up of the reader:
the count per request is the figure a change of the write pattern moves deterministically, where
CPU time on a small machine is noisy. Loopback only; bounded by the request count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.bench_proxy import fake_bench_config, start_server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.count_sends", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--tokens", type=int, default=8, help="tokens per stream (the fake worker's output)")
    p.add_argument("--stream-interval", type=int, default=1, help="the pool's stream_interval")
    args = p.parse_args(argv)
    if not shutil.which("strace"):
        print("needs strace: apt-get install strace", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-count-sends-"))
    config, port, _ = fake_bench_config(tmp, devices=["cpu"], replicas={"hot": 1}, stream_interval=args.stream_interval,
                                        fake={"token_latency_ms": 1, "output_tokens": args.tokens})
    config["cache"] = {"enabled": False}
    server = start_server(config, tmp / "c.yaml", port)
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "go"}], "stream": True,
                       "max_tokens": args.tokens}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def one() -> None:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test-premium"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    try:
        one()
        out = tmp / "strace.txt"
        tracer = subprocess.Popen(["strace", "-c", "-e", "trace=write,sendto,sendmsg,writev", "-o", str(out),
                                   "-p", str(server.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached
        for _ in range(args.requests):
            one()
        time.sleep(0.5)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        # strace -c's last line: "% time, seconds, usecs/call, calls, [errors,] total"
        totals = [line.split() for line in out.read_text().splitlines() if line.endswith("total")]
        calls = int(totals[-1][3]) if totals else 0
    finally:
        conn.close()
        server.terminate()
        server.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"requests": args.requests, "tokens_per_stream": args.tokens,
                      "stream_interval": args.stream_interval, "send_calls": calls,
                      "sends_per_request": round(calls / args.requests, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
