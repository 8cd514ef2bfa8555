"""Batching on CPU with the embedded model: output tokens/s at 8 concurrent requests against one
request at a time, in one run (the engine's CPU path: same code, no CUDA graphs).

    python -m loadtest.bench_cpu [--model DIR] [--new-tokens 64] [--sampled] [--out reports/bench-cpu.json]

--sampled also runs 8 concurrent requests sampled at temperature 0.7, with the engine's sampler
and with the one before it (loadtest.bench_gpu.gumbel_sample_before), alternated, twice.
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
    p.add_argument("--sampled", action="store_true", help="also sampled at 0.7: this sampler against the one before")
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
    if args.sampled:
        from backend import sampling
        from loadtest.bench_gpu import gumbel_sample_before

        current, sampled = sampling.sample, {}
        try:
            for rounds in range(2):
                for name, fn in (("inverse_transform", current), ("gumbel_before", gumbel_sample_before)):
                    sampling.sample = fn  # the engine calls sampling.sample
                    r = run_engine(engine, prompt, 8, 16, args.new_tokens, temperature=0.7)
                    sampled.setdefault(name, []).append(r)
                    print(name, r, file=sys.stderr, flush=True)
        finally:
            sampling.sample = current
        result.update({f"sampled_tokens_per_s_8_{k}": max(r["tokens_per_s"] for r in v) for k, v in sampled.items()},
                      sampled_runs=sampled)
    return write_json(result, args.out, shown={k: v for k, v in result.items() if not k.endswith("runs")})


if __name__ == "__main__":
    sys.exit(main())
