"""Throughput gain of coalescing + cache at a realistic duplicate share, against both switched
off, measured in one run (rounds alternate on/off). Fake workers with a per-token latency stand in
for a GPU, so generation is the bottleneck as in production.

    python -m loadtest.bench_cache [--duplicate-share 0.2] [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


from loadtest.bench_proxy import fake_bench_config, start_server
from loadtest.report import summarize, write_json
from loadtest.runner import run_workload
from loadtest.workload import TierMix, Workload


def serve(tmp: Path, cache_on: bool) -> tuple[subprocess.Popen, int]:
    config, port, _ = fake_bench_config(tmp / ("on" if cache_on else "off"), max_batch_size=8,
                                        max_inflight_per_worker=8, fake={"token_latency_ms": 10, "output_tokens": 32})
    config["cache"] = {"enabled": cache_on, "coalesce": cache_on}
    for tier in config["tiers"]:
        tier.update(max_queue=1024, queue_timeout_s=60)
    proc = start_server(config, tmp / f"cache-{'on' if cache_on else 'off'}.yaml", port)
    return proc, port


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_cache", description=__doc__)
    p.add_argument("--duplicate-share", type=float, default=0.2)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", default="reports/bench-cache.json")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-bench-cache-"))
    servers = {"on": serve(tmp, True), "off": serve(tmp, False)}
    results: dict[str, list] = {"on": [], "off": []}
    try:
        for r in range(args.rounds):
            for mode in ("off", "on"):
                _, port = servers[mode]
                w = Workload(url=f"http://127.0.0.1:{port}", admin_url=f"http://127.0.0.1:{port}", mode="closed",
                             concurrency=args.concurrency, duration_s=args.duration,
                             tiers={"standard": TierMix(key="sk-test-standard")}, stream_share=0.5,
                             duplicate_share=args.duplicate_share, max_tokens=(32, 32), seed=100 + r)
                s = summarize(asyncio.run(run_workload(w, progress=False)))
                results[mode].append(s)
                print(f"round {r + 1} cache {mode}: {s['overall']['throughput_rps']} req/s, "
                      f"cache outcomes {s['overall']['cache']}", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    on = statistics.median(s["overall"]["throughput_rps"] for s in results["on"])
    off = statistics.median(s["overall"]["throughput_rps"] for s in results["off"])
    summary = {"duplicate_share": args.duplicate_share, "concurrency": args.concurrency,
               "duration_s": args.duration, "rounds": args.rounds, "rps_cache_on": on, "rps_cache_off": off,
               "gain": on / off,
               "p50_ms_on": statistics.median(s["overall"]["latency"]["p50_ms"] for s in results["on"]),
               "p50_ms_off": statistics.median(s["overall"]["latency"]["p50_ms"] for s in results["off"]),
               "cache_outcomes_on": results["on"][-1]["overall"]["cache"]}
    return write_json({"summary": summary, "rounds": results}, args.out, shown=summary)


if __name__ == "__main__":
    sys.exit(main())
