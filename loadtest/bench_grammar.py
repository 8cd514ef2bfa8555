"""The per-token cost of constrained decoding (structured outputs), engine alone, in one run:
the same batch decoded unconstrained and constrained by a JSON schema grammar (llguidance).

Reported per batch size: engine µs per generated token for both (every row generates exactly
--tokens: EOS ignored, and a schema that cannot be complete sooner), the ratio, and the grammar's
own share: the time spent computing and applying token masks (`_shape_logits`), per constrained
token (advancing a matcher by its sampled token is in the step time only); then, with a schema an
answer can complete, how many rows ended complete and parsed.

    python -m loadtest.bench_grammar [--model DIR] [--device cpu|cuda] [--batch 1,8] [--tokens 64]
        [--out docs/results/bench-grammar-cpu.json]

On CPU the default model is the embedded one (real weights). On the GPU host pass a directory made
by loadtest.bench_gpu's shapes (random weights: the grammar keeps the output valid anyway).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import llguidance

from backend.engine import TransformersEngine
from backend.protocol import ChatMessage, Finished, Generate, SamplingParams, Tokens, WorkerSettings
from loadtest.report import write_json

# Cost: every row generates exactly --tokens (the grammar cannot be complete before: at least 100
# records), so constrained and unconstrained batches run the same steps at the same sizes.
LONG_SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}}
# Validity: a schema the answer can complete; the share of rows that end complete and parse.
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "maxItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                     "city": {"enum": ["Paris", "Berlin", "Rome", "Oslo", "Lisbon"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
PROMPT = "List many people with their name, age and city as JSON."


def run_batch(engine: TransformersEngine, batch: int, tokens: int, grammar: str) -> dict:
    frames: list = []
    engine.emit = frames.extend
    for i in range(batch):
        engine.submit(Generate(id=i, messages=[ChatMessage("user", PROMPT)],
                               params=SamplingParams(max_tokens=tokens, temperature=0.7, seed=i,
                                                     ignore_eos=not grammar, grammar=grammar)))
    open_ids, produced, valid = set(range(batch)), 0, 0
    texts = {i: [] for i in range(batch)}
    started = time.perf_counter()
    while open_ids:
        engine.step()
        for f in frames:
            if isinstance(f, Tokens):
                produced += len(f.token_ids)
                texts[f.id].append(f.text)
            elif f.id in open_ids:
                open_ids.discard(f.id)
                if isinstance(f, Finished) and grammar and f.finish_reason == "stop":
                    try:
                        json.loads("".join(texts[f.id]))
                        valid += 1
                    except ValueError:
                        pass
        frames.clear()
    wall = time.perf_counter() - started
    return {"tokens": produced, "wall_s": round(wall, 4), "us_per_token": round(wall / produced * 1e6, 1),
            "parsed_complete": valid}


def instrument(engine: TransformersEngine) -> dict:
    """Accumulate the time of the logits shaping step (for these requests: the grammar's masks)."""
    spent = {"mask_s": 0.0, "advance_s": 0.0}
    shape = engine._shape_logits

    def timed_shape(logits, seqs):
        if logits.is_cuda:  # the shaping alone, not the decode step queued before it
            import torch

            torch.cuda.synchronize()
        t = time.perf_counter()
        shape(logits, seqs)
        if logits.is_cuda:
            torch.cuda.synchronize()
        spent["mask_s"] += time.perf_counter() - t

    engine._shape_logits = timed_shape
    advance = engine._advance

    def timed_advance(seqs, ids, frames):  # host work per step: matchers, detokenising, frames
        t = time.perf_counter()
        advance(seqs, ids, frames)
        spent["advance_s"] += time.perf_counter() - t

    engine._advance = timed_advance
    return spent


def main() -> None:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="", help="GPU host: build this random-weight shape (loadtest/models/) "
                    "with --tokenizer's files instead of loading --model")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="reports/bench-grammar.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.shape:
        import tempfile

        from loadtest.bench_gpu import build_model

        args.model = str(build_model(args.shape, Path(args.tokenizer), Path(tempfile.mkdtemp())))
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="bench", model_path=args.model,
                                               device=args.device, max_batch_size=max(batches), max_context=1024,
                                               verify_manifest=False, cpu_threads=0))
    engine.warm_up()
    options = {"whitespace_flexible": False}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), overrides=options)
    long_grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(LONG_SCHEMA), overrides=options)
    spent = instrument(engine)
    run_batch(engine, 1, 8, grammar)  # builds llguidance's tokenizer (once per engine) outside the timing
    rows = []
    for batch in batches:
        spent["advance_s"] = 0.0
        free = run_batch(engine, batch, args.tokens, "")
        free["advance_us_per_token"] = round(spent["advance_s"] / free["tokens"] * 1e6, 1)
        spent["mask_s"] = spent["advance_s"] = 0.0
        constrained = run_batch(engine, batch, args.tokens, long_grammar)
        constrained["advance_us_per_token"] = round(spent["advance_s"] / constrained["tokens"] * 1e6, 1)
        complete = run_batch(engine, batch, args.tokens, grammar)
        row = {"batch": batch, "unconstrained": free, "constrained": constrained,
               "answers_complete_and_parsed": f"{complete['parsed_complete']}/{batch}",
               "constrained_over_unconstrained": round(constrained["us_per_token"] / free["us_per_token"], 3),
               "mask_us_per_token": round(spent["mask_s"] / constrained["tokens"] * 1e6, 1)}
        rows.append(row)
        print(f"batch {batch:4d}: unconstrained {free['us_per_token']:8.1f} us/token, constrained "
              f"{constrained['us_per_token']:8.1f} us/token ({row['constrained_over_unconstrained']:.2f}x); "
              f"masks {row['mask_us_per_token']:.1f} us/token; advance {free['advance_us_per_token']} -> "
              f"{constrained['advance_us_per_token']} us/token; complete and parsed: {complete['parsed_complete']}/{batch}",
              flush=True)
    results = {"device": args.device, "model": args.model, "tokens": args.tokens, "rows": rows,
               "command": "python -m loadtest.bench_grammar " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if k != "model")}
    write_json(results, args.out, shown={"written": args.out})


if __name__ == "__main__":
    main()
