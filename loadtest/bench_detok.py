"""Host time of one step's batched detokenisation: the two id windows per running row that the
scheduler decodes every step (backend/textstream.py), through transformers' batch_decode and
through the engine's detokenize_batch, alternated in one process, with the same text.

    python -m loadtest.bench_detok [--model DIR] [--rows 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from backend.engine import TransformersEngine
from backend.protocol import WorkerSettings


def step_windows(tokenizer, rows: int) -> list[list[int]]:
    """Each row's prefix and full window (6 and 7 ids) at a random place in a mixed-script text."""
    ids = tokenizer("Serving text with words, numbers 12345, Ünïcödé ✓ 你好 世界 🙂 and code: x = f(y)\n" * 40).input_ids
    rng = random.Random(0)
    windows = []
    for _ in range(rows):
        start = rng.randrange(0, len(ids) - 8)
        windows += [ids[start:start + 6], ids[start:start + 7]]
    return windows


def main(argv=None) -> int:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    p = argparse.ArgumentParser(prog="python -m loadtest.bench_detok", description=__doc__)
    p.add_argument("--model", type=Path, default=default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="embedded", model_path=str(args.model),
                                               max_batch_size=1, max_context=64))
    windows = step_windows(engine.tokenizer, args.rows)
    ways = {"transformers batch_decode": lambda: engine.tokenizer.batch_decode(windows, skip_special_tokens=True),
            "engine detokenize_batch": lambda: engine.detokenize_batch(windows)}
    assert ways["transformers batch_decode"]() == ways["engine detokenize_batch"]()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, call in ways.items():
            t0 = time.perf_counter()
            for _ in range(20):
                call()
            times[name].append((time.perf_counter() - t0) / 20 * 1000)
    base = statistics.median(times["transformers batch_decode"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"{name}: {ms:.3f} ms per step of {args.rows} rows ({base / ms:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
