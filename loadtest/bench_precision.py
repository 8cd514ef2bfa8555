"""The precision table for this engine: per pool `dtype`, the weight memory, the output speed and,
on the real embedded model, the quality loss, all in one run.

For each precision: weight memory (what the worker reports, % of float32); engine-alone output
tok/s at 1 and at --batch concurrent (closed loop, EOS ignored; × the reference precision); and on
CPU with the embedded model (real weights) the perplexity on the fixed texts in
loadtest/data/precision_texts.txt (change in % against float32) and greedy agreement: the share of
prompts whose first 32 greedy tokens equal float32's. On the GPU host, --shapes builds random-weight
models of the committed shapes (loadtest/models/): memory and speed only, no quality figure (random
weights have none).

    python -m loadtest.bench_precision [--dtypes float32,bfloat16,float16,int8] [--batch 64]
        [--out docs/results/bench-precision-cpu.json]
    python -m loadtest.bench_precision --device cuda --shapes llama-3.2-1b,llama-3.1-8b \\
        --tokenizer .gpu/tokenizer --out $OUT/bench-precision-gpu.json
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path

import torch

from backend.engine import TransformersEngine
from backend.protocol import ChatMessage, Finished, Generate, SamplingParams, Tokens, WorkerSettings
from loadtest.bench_gpu import run_engine
from loadtest.report import write_json

HERE = Path(__file__).resolve().parent
TEXTS = HERE / "data" / "precision_texts.txt"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "Give me three tips for learning a language.", "What is 12 times 13?", "Describe a cat to a child.",
           "Name the planets of the solar system.", "How do I boil an egg?", "What causes rain?",
           "Write one sentence about autumn.", "Who wrote Romeo and Juliet?", "Translate 'good morning' to French.",
           "List four primary colors.", "Why is the sky blue?", "Suggest a name for a dog.",
           "Summarise the water cycle in two sentences."]
AGREE_TOKENS = 32


def perplexity(engine: TransformersEngine) -> float:
    """exp(mean negative log-likelihood) over every line of the fixed texts (plain forward passes)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for line in TEXTS.read_text().splitlines():
            ids = engine.tokenizer(line, return_tensors="pt").input_ids.to(engine.device)
            logits = engine.model(ids).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def greedy(engine: TransformersEngine) -> list[list[int]]:
    frames: list = []
    engine.emit = frames.extend
    for i, prompt in enumerate(PROMPTS):
        engine.submit(Generate(id=i, messages=[ChatMessage("user", prompt)],
                               params=SamplingParams(max_tokens=AGREE_TOKENS, temperature=0.0, ignore_eos=True)))
    out = {i: [] for i in range(len(PROMPTS))}
    done = 0
    with torch.inference_mode():
        while done < len(PROMPTS):
            engine.step()
            for f in frames:
                if isinstance(f, Tokens):
                    out[f.id].extend(f.token_ids)
                elif isinstance(f, Finished):
                    done += 1
            frames.clear()
    return [out[i] for i in range(len(PROMPTS))]


def measure(model_dir: str, device: str, dtype: str, batch: int, tokens: int, quality: bool) -> dict:
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="bench", model_path=model_dir,
                                               device=device, dtype=dtype, max_batch_size=max(batch, len(PROMPTS)),
                                               max_context=512, verify_manifest=False))
    if device.startswith("cuda"):
        print(f"  {dtype}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated after loading", flush=True)
    engine.warm_up()
    row = {"dtype": dtype, "weight_bytes": engine.weight_bytes}
    prompt = "Tell me about the history of the printing press and how it changed Europe."
    for concurrency in (1, batch):
        result = run_engine(engine, prompt, concurrency, concurrency, tokens)
        row[f"tok_s_{concurrency}"] = result["tokens_per_s"]
    if quality:
        row["perplexity"] = round(perplexity(engine), 4)
        row["greedy"] = greedy(engine)
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_data_dir() / "models" / EMBEDDED_MODEL_DIRNAME))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16,int8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--shapes", default="", help="GPU host: random-weight shapes to build (loadtest/models/)")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer")
    ap.add_argument("--out", default="reports/bench-precision.json")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    models = {"embedded": args.model}
    if args.shapes:
        from loadtest.bench_gpu import build_model

        models = {shape: str(build_model(shape, Path(args.tokenizer), Path(tempfile.mkdtemp())))
                  for shape in args.shapes.split(",")}
    quality = not args.shapes
    results = {"device": args.device, "batch": args.batch, "tokens": args.tokens, "models": {},
               "command": "python -m loadtest.bench_precision " + " ".join(
                   f"--{k} {v}" for k, v in vars(args).items() if k not in ("model", "tokenizer") and v)}
    for name, path in models.items():
        rows = []
        for dtype in dtypes:
            started = time.perf_counter()
            try:
                row = measure(path, args.device, dtype, args.batch, args.tokens, quality)
            except Exception as exc:  # noqa: BLE001 - one precision failing must not lose the others
                import traceback

                traceback.print_exc(limit=-8)
                results.setdefault("failed", []).append(f"{name} {dtype}: {type(exc).__name__}: {exc}"[:600])
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(f"{name} {dtype}: {row['weight_bytes'] / 2**20:.0f} MiB, {row['tok_s_1']} tok/s at 1, "
                  f"{row[f'tok_s_{args.batch}']} at {args.batch}" +
                  (f", perplexity {row['perplexity']}" if quality else ""), flush=True)
        reference = rows[0]  # the first precision listed (float32 by default)
        for row in rows:
            row["weight_pct_of_reference"] = round(100 * row["weight_bytes"] / reference["weight_bytes"], 1)
            for key in ("tok_s_1", f"tok_s_{args.batch}"):
                row[key.replace("tok_s", "speed_x")] = round(row[key] / reference[key], 2)
            if quality:
                row["perplexity_change_pct"] = round(100 * (row["perplexity"] / reference["perplexity"] - 1), 2)
                same = sum(a == b for a, b in zip(row["greedy"], reference["greedy"]))
                row["greedy_agreement"] = f"{same}/{len(PROMPTS)}"
        for row in rows:
            row.pop("greedy", None)
        results["models"][name] = rows
    write_json(results, args.out, shown={k: v for k, v in results.items() if k != "command"})


if __name__ == "__main__":
    main()
