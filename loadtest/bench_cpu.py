"""Batching on CPU with the embedded model: output tokens/s at 8 concurrent requests against one
request at a time, in one run (the engine's CPU path: same code, no CUDA graphs).

    python -m loadtest.bench_cpu [--model DIR] [--new-tokens 64] [--out reports/bench-cpu.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.engine import TransformersEngine
from backend.protocol import WorkerSettings
from loadtest.bench_gpu import run_engine
from loadtest.report import write_json


def main(argv=None) -> int:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    p = argparse.ArgumentParser(prog="python -m loadtest.bench_cpu", description=__doc__)
    p.add_argument("--model", type=Path, default=default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="reports/bench-cpu.json")
    args = p.parse_args(argv)
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="embedded", model_path=str(args.model),
                                               max_batch_size=8, max_context=512))
    engine.warm_up()
    prompt = " word" * 128
    runs = {}
    for rounds in range(2):  # alternate, twice
        for c in (1, 8):
            r = run_engine(engine, prompt, c, 8 if c == 1 else 16, args.new_tokens)
            runs.setdefault(c, []).append(r)
            print(r, file=sys.stderr, flush=True)
    best = {c: max(r["tokens_per_s"] for r in rs) for c, rs in runs.items()}
    result = {"prompt_tokens": len(engine.tokenizer(prompt).input_ids), "new_tokens": args.new_tokens,
              "tokens_per_s_1": best[1], "tokens_per_s_8": best[8], "speedup": round(best[8] / best[1], 2),
              "runs": runs}
    return write_json(result, args.out, shown={k: v for k, v in result.items() if k != "runs"})


if __name__ == "__main__":
    sys.exit(main())
