"""Chaos benchmark: steady open-loop load on three fake workers while a random worker is
SIGKILLed through the admin API every few seconds. Reports the success ratio and latency
percentiles (and writes the JSON, Markdown and PNGs of the load generator).

    python -m loadtest.bench_chaos [--rate 50] [--duration 60] [--chaos-every 5]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path


from loadtest.bench_proxy import fake_bench_config, start_server
from loadtest.report import markdown, summarize, write_reports
from loadtest.runner import run_workload
from loadtest.workload import TierMix, Workload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_chaos", description=__doc__)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--chaos-every", type=float, default=5.0)
    p.add_argument("--out", default="reports")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-chaos-"))
    config, port, admin = fake_bench_config(tmp, devices=["cpu"] * 3, replicas={"hot": 3},
                                            fake={"token_latency_ms": 10, "output_tokens": 32, "boot_delay_ms": 500})
    config["workers"] = {"restart_backoff_initial_s": 0.5}
    config["cache"] = {"enabled": False}
    server = start_server(config, tmp / "c.yaml", port)
    try:
        w = Workload(url=f"http://127.0.0.1:{port}", admin_url=f"http://127.0.0.1:{admin}",
                     admin_token=(tmp / "admin.token").read_text().strip(), rate=args.rate,
                     duration_s=args.duration, chaos_every_s=args.chaos_every, stream_share=0.5,
                     max_tokens=(16, 32), tiers={"premium": TierMix(key="sk-test-premium", share=0.2),
                                                 "standard": TierMix(key="sk-test-standard", share=0.5),
                                                 "batch": TierMix(key="sk-test-batch", share=0.3)})
        run = asyncio.run(run_workload(w, progress=False))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    write_reports(run, Path(args.out), "chaos")
    print(markdown(summarize(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
