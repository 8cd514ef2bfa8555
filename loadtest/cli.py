"""`fullpower loadtest` / `python -m loadtest`: offer a workload to a running server, report it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import msgspec

from loadtest.report import markdown, summarize, write_reports
from loadtest.runner import run_workload
from loadtest.workload import load_workload


def _tiers(spec: str | None) -> dict | None:
    """'premium=sk-a:0.2,standard=sk-b:0.5' -> {"premium": {"key": "sk-a", "share": 0.2}, ...}"""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, _, rest = part.partition("=")
        key, _, share = rest.partition(":")
        out[name.strip()] = {"key": key.strip(), "share": float(share or 1)}
    return out


def _pair(spec: str | None):
    if not spec:
        return None
    lo, _, hi = spec.partition("-")
    return [int(lo), int(hi or lo)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fullpower loadtest", description=__doc__)
    p.add_argument("--workload", help="YAML file with the workload (flags override it)")
    p.add_argument("--url")
    p.add_argument("--admin-url")
    p.add_argument("--admin-token-file", help="the admin token, for --chaos-every")
    p.add_argument("--model")
    p.add_argument("--mode", choices=["open", "closed"])
    p.add_argument("--rate", type=float, help="open loop: requests per second (Poisson arrivals)")
    p.add_argument("--concurrency", type=int, help="closed loop: clients")
    p.add_argument("--duration", type=float, dest="duration_s")
    p.add_argument("--max-requests", type=int, dest="max_requests")
    p.add_argument("--tiers", help="name=key:share,... e.g. premium=sk-test-premium:0.2,batch=sk-test-batch:0.8")
    p.add_argument("--prompt-words", help="LOW-HIGH")
    p.add_argument("--max-tokens", help="LOW-HIGH")
    p.add_argument("--ignore-eos", action="store_true", default=None, help="send ignore_eos (fixed output length)")
    p.add_argument("--min-tokens", type=int, help="send min_tokens (capped at each request's max_tokens)")
    p.add_argument("--stream-share", type=float)
    p.add_argument("--duplicate-share", type=float)
    p.add_argument("--chaos-every", type=float, dest="chaos_every_s", help="kill a random worker every N seconds")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default="reports", help="directory for JSON, Markdown and PNG (default: reports/)")
    p.add_argument("--name", default="loadtest", help="file name stem")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("url", "admin_url", "model", "mode", "rate", "concurrency",
                                                "duration_s", "max_requests", "stream_share", "duplicate_share",
                                                "chaos_every_s", "seed", "ignore_eos", "min_tokens")}
    if args.admin_token_file:
        overrides["admin_token"] = Path(args.admin_token_file).read_text().strip()
    overrides["tiers"] = _tiers(args.tiers)
    overrides["prompt_words"] = _pair(args.prompt_words)
    overrides["max_tokens"] = _pair(args.max_tokens)
    try:
        workload = load_workload(args.workload, overrides)
    except (msgspec.ValidationError, ValueError, OSError) as exc:
        print(f"invalid workload: {exc}", file=sys.stderr)
        return 2
    run = asyncio.run(run_workload(workload, progress=not args.quiet))
    paths = write_reports(run, Path(args.out), args.name, with_plots=not args.no_plots)
    print(markdown(summarize(run)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
