"""The proxy's CPU per request, for two checkouts side by side (before and after a change).

For each checkout in turn (rounds interleaved): start `make bench`'s stack (the aiohttp stub,
nginx in front of it, fullpower with fake-engine workers at zero token latency; loadtest.bench_proxy's
Stack), then drive it with wrk (`-t1 -c64`) at nginx, at fullpower's cache hits (temperature 0)
and through to its workers (temperature 0.5, never cached), and read the proxy process's own CPU
time (and its workers') from /proc around each run. Reports req/s, the ratio to nginx in the
same stack, and microseconds of proxy CPU per request - the figure a faster machine does not
flatter. Loopback only; every run is bounded in time.

    python -m loadtest.bench_request_cpu --trees /path/to/before /path/to/after [--rounds 2] [--duration 5]

A checkout for "before" is `git worktree add /tmp/before <commit>` (with this checkout's .venv
linked into it). Without --trees, this checkout alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from loadtest.bench_proxy import ROOT, Stack, chat_body, wrk
from loadtest.bench_stream import children, cpu_seconds

CASES = {"nginx": 0.5, "cache_hit": 0.0, "workers": 0.5}  # case -> the request's temperature


def measure(root: Path, duration: float, connections: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fp-reqcpu-"))
    stack = Stack(tmp, root=root)
    try:
        stack.start()
        proxy, workers = stack.fullpower.pid, children(stack.fullpower.pid)
        out = {}
        for case, temperature in CASES.items():
            port = stack.nginx_port if case == "nginx" else stack.fp_port
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, chat_body(temperature), 2, connections, tmp)  # warm up (and fill the cache)
            proxy_before, workers_before = cpu_seconds(proxy), sum(cpu_seconds(w) for w in workers)
            run = wrk(url, chat_body(temperature), duration, connections, tmp)
            proxy_cpu = cpu_seconds(proxy) - proxy_before
            workers_cpu = sum(cpu_seconds(w) for w in workers) - workers_before
            requests = run["rps"] * round(duration)
            out[case] = {"rps": run["rps"], "errors": run["errors"] + run["non2xx"]}
            if case != "nginx":
                out[case].update(proxy_cpu_us_per_request=proxy_cpu / requests * 1e6,
                                 workers_cpu_us_per_request=workers_cpu / requests * 1e6,
                                 proxy_core_share=proxy_cpu / duration)
        for case in ("cache_hit", "workers"):
            out[case]["vs_nginx"] = out[case]["rps"] / out["nginx"]["rps"]
        return out
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_request_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    if not shutil.which("wrk") or not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("needs wrk and nginx: apt-get install wrk nginx-light", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {str(t): [] for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees:
            result = measure(tree.resolve(), args.duration, args.connections)
            runs[str(tree)].append(result)
            print(f"round {r + 1} {tree}: " + ", ".join(
                f"{case} {v['rps']:.0f} req/s" + (f" {v['proxy_cpu_us_per_request']:.1f} us/req" if case != "nginx" else "")
                for case, v in result.items()), file=sys.stderr)
    summary = {}
    for tree, results in runs.items():
        summary[tree] = {case: {figure: statistics.median(r[case][figure] for r in results)
                                for figure in results[0][case]} for case in CASES}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
