"""The served step anatomy: where each worker's engine loop spent its host time during a run, from
two scrapes of `/metrics` (before and after): milliseconds per decode step by part
(`fullpower_worker_host_seconds_total{part}` over `fullpower_worker_decode_steps_total`).

    python -m loadtest.served_anatomy BEFORE.txt AFTER.txt
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict:
    """(metric sample name, worker, part) -> value for the two worker-loop metrics."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("fullpower_worker_host_seconds_total", "fullpower_worker_decode_steps_total"):
                out[(s.name, s.labels.get("worker", ""), s.labels.get("part", ""))] = s.value
    return out


def anatomy(before: str, after: str) -> dict:
    """{worker: {"decode_steps": n, "per_step_ms": {part: ms}}} over the window between the scrapes."""
    start, end = _samples(before), _samples(after)
    steps: dict[str, float] = {}
    parts: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in end.items():
        name, worker, part = key
        delta = value - start.get(key, 0.0)
        if name == "fullpower_worker_decode_steps_total":
            steps[worker] = delta
        else:
            parts[worker][part] = delta
    return {worker: {"decode_steps": int(steps.get(worker, 0)),
                     "per_step_ms": {part: round(seconds * 1000 / max(1.0, steps.get(worker, 0)), 3)
                                     for part, seconds in sorted(by_part.items())}}
            for worker, by_part in sorted(parts.items())}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f, open(args[1]) as g:
        print(json.dumps(anatomy(f.read(), g.read())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
