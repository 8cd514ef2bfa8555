"""Turns a run into numbers (throughput, success and shed ratios, percentiles per tier) and writes
them as JSON, Markdown and PNG plots (latency over time with chaos events marked, latency CDF)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.runner import Run

PERCENTILES = (50, 90, 99, 99.9)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _dist(values: list[float]) -> dict:
    return {f"p{p:g}_ms": (None if (v := percentile(values, p)) is None else round(v * 1000, 3)) for p in PERCENTILES}


def summarize(run: Run) -> dict:
    def stats(results) -> dict:
        n = len(results)
        ok = [r for r in results if r.status == 200]
        shed = [r for r in results if r.status in (429, 503)]
        return {
            "requests": n,
            "succeeded": len(ok),
            "success_ratio": round(len(ok) / n, 5) if n else None,
            "shed_ratio": round(len(shed) / n, 5) if n else None,
            "errors": n - len(ok) - len(shed),
            "throughput_rps": round(len(ok) / run.wall_s, 2) if run.wall_s else None,
            "output_tokens_per_s": round(sum(r.completion_tokens for r in ok) / run.wall_s, 1) if run.wall_s else None,
            "latency": _dist([r.total_s for r in ok]),
            "ttft": _dist([r.ttft_s for r in ok if r.ttft_s is not None]),
            "inter_token": _dist([x for r in ok for x in r.inter_token_s]),
            "cache": {c: sum(1 for r in results if r.cache == c) for c in sorted({r.cache for r in results if r.cache})},
        }

    w = run.workload
    return {
        "workload": {"mode": w.mode, "rate": w.rate if w.mode == "open" else None,
                     "concurrency": w.concurrency if w.mode == "closed" else None, "duration_s": w.duration_s,
                     "stream_share": w.stream_share, "duplicate_share": w.duplicate_share,
                     "chaos_every_s": w.chaos_every_s, "tiers": {t: m.share for t, m in w.tiers.items()}},
        "wall_s": round(run.wall_s, 3),
        "overall": stats(run.results),
        "per_tier": {t: stats([r for r in run.results if r.tier == t]) for t in w.tiers},
        "chaos_events": [{"at_s": round(t, 3), "worker": wid} for t, wid in run.chaos_events],
        "status_counts": {str(s): sum(1 for r in run.results if r.status == s)
                          for s in sorted({r.status for r in run.results})},
    }


def markdown(summary: dict) -> str:
    w = summary["workload"]
    load = f"open loop at {w['rate']} req/s" if w["mode"] == "open" else f"closed loop, {w['concurrency']} clients"
    lines = [f"# Load test: {load} for {w['duration_s']} s", "",
             f"Streaming share {w['stream_share']}, duplicate share {w['duplicate_share']}, chaos every "
             f"{w['chaos_every_s'] or '-'} s ({len(summary['chaos_events'])} workers killed). Statuses: "
             f"{summary['status_counts']}.", "",
             "| tier | requests | success | shed | req/s | tok/s | latency P50 / P90 / P99 / P99.9 ms | "
             "TTFT P50 / P99 ms | inter-token P50 / P99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v):
        return "-" if v is None else f"{v:g}"

    rows = [("all", summary["overall"])] + list(summary["per_tier"].items())
    for name, s in rows:
        lat, ttft, itl = s["latency"], s["ttft"], s["inter_token"]
        lines.append(
            f"| {name} | {s['requests']} | {fmt(s['success_ratio'])} | {fmt(s['shed_ratio'])} | "
            f"{fmt(s['throughput_rps'])} | {fmt(s['output_tokens_per_s'])} | "
            f"{' / '.join(fmt(lat[k]) for k in ('p50_ms', 'p90_ms', 'p99_ms', 'p99.9_ms'))} | "
            f"{fmt(ttft['p50_ms'])} / {fmt(ttft['p99_ms'])} | {fmt(itl['p50_ms'])} / {fmt(itl['p99_ms'])} |")
    return "\n".join(lines) + "\n"


def plots(run: Run, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in run.results if r.status == 200]
    fig, ax = plt.subplots(figsize=(9, 4))
    for tier in run.workload.tiers:
        pts = sorted((r.start, r.total_s * 1000) for r in ok if r.tier == tier)
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, label=tier)
    failed = [(r.start, r.total_s * 1000) for r in run.results if r.status != 200]
    if failed:
        ax.scatter([p[0] for p in failed], [p[1] for p in failed], s=6, marker="x", color="red", label="failed/shed")
    for t, wid in run.chaos_events:
        ax.axvline(t, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"kill {wid}", (t, ax.get_ylim()[1] * 0.95), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency over time")
    ax.legend(fontsize=7)
    path = out / f"{stem}-latency.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for tier in run.workload.tiers:
        values = sorted(r.total_s * 1000 for r in ok if r.tier == tier)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=tier)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF")
    ax.legend(fontsize=7)
    path = out / f"{stem}-cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def write_json(results: dict, path: str | Path, shown: dict | None = None) -> int:
    """Write a benchmark's results as JSON and print them (or the `shown` summary); exit code 0."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results if shown is None else shown, indent=2))
    return 0


def write_reports(run: Run, out: Path, stem: str = "loadtest", with_plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(run)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["markdown"].write_text(markdown(summary))
    if with_plots:
        latency, cdf = plots(run, out, stem)
        paths["latency_png"], paths["cdf_png"] = latency, cdf
    return paths
