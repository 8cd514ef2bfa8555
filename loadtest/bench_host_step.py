"""Host time of one decode step's bookkeeping in the worker, per running row: the scheduler's
`_advance` (token appended, end checks, detokenisation, stop sequences, the Tokens frames) and the
frames' encoding for the proxy - the host work a pipelined GPU step waits for when it is longer than
the step. The real tokenizer of the embedded model; rows advance through a mixed-script text (so
some tokens are parts of multi-byte characters); no model forward is timed.

    python -m loadtest.bench_host_step [--model DIR] [--rows 256] [--steps 100] [--rounds 5]

Reports the median over rounds of µs per row per step for the bookkeeping and for the encoding,
with each row's text from the tokenizer's windows and from the engine's token text table
(`token_text`, where its tokenizer has one), alternated in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from backend import protocol
from backend.engine import TransformersEngine
from backend.protocol import ChatMessage, Generate, SamplingParams, WorkerSettings

TEXT = ("Serving text with words, numbers 12345, Ünïcödé ✓ 你好 世界 🙂 and code: x = f(y)\n"
        "The quick brown fox jumps over the lazy dog; ÅÄÖ åäö — “quotes” and emoji 🚀🔥.\n")


def main(argv=None) -> int:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    p = argparse.ArgumentParser(prog="python -m loadtest.bench_host_step", description=__doc__)
    p.add_argument("--model", type=Path, default=default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    context = 64 + args.steps + 16
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="embedded",
                                               model_path=str(args.model), max_batch_size=args.rows,
                                               max_context=context))
    text_ids = engine.tokenizer(TEXT * 40).input_ids
    table = getattr(engine, "token_text", None)  # engines before the table have none
    ways = {"tokenizer windows": None, "token text table": table} if table is not None else {"tokenizer windows": None}
    advance_us: dict[str, list[float]] = {name: [] for name in ways}
    encode_us: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():  # alternated, same process
            engine.token_text = way
            seqs = [engine._start(Generate(id=i, params=SamplingParams(max_tokens=args.steps + 8),
                                           messages=[ChatMessage("user", f"row {i}")]))
                    for i in range(args.rows)]
            offsets = [(97 * i) % (len(text_ids) - args.steps - 1) for i in range(args.rows)]
            t_advance = t_encode = 0.0
            for step in range(args.steps):
                ids = [text_ids[o + step] for o in offsets]
                frames: list = []
                t0 = time.perf_counter()
                engine._advance(seqs, ids, frames)
                t1 = time.perf_counter()
                protocol.encode_many(frames)
                t2 = time.perf_counter()
                t_advance += t1 - t0
                t_encode += t2 - t1
            per = 1e6 / (args.steps * args.rows)
            advance_us[name].append(t_advance * per)
            encode_us[name].append(t_encode * per)
    base = statistics.median(advance_us["tokenizer windows"])
    for name in ways:
        a, e = statistics.median(advance_us[name]), statistics.median(encode_us[name])
        print(f"{name}, rows {args.rows}: advance {a:.2f} µs/row ({a * args.rows / 1000:.3f} ms/step, "
              f"{base / a:.2f}x), encode {e:.2f} µs/row ({e * args.rows / 1000:.3f} ms/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
