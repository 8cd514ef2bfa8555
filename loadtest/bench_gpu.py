"""GPU worker throughput (run on the GPU host): the slot engine against plain HF `generate`, in
one run, for the SmolLM2-135M and Llama-3.2-1B shapes with random weights (configs committed under
loadtest/models/, tokenizer from the embedded model). Prompt 128 tokens, 128 new tokens, EOS
ignored. Also checks greedy output of the engine against HF generate token for token.

    python -m loadtest.bench_gpu --tokenizer DIR [--shapes smollm2-135m,llama-3.2-1b]
        [--concurrency 1,16,64,256] [--out reports/bench-gpu.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from backend import compiling, decode_attention, layer_kernels
from backend.engine import PREFILL_TOKEN_BUDGET, TransformersEngine
from backend.fp8 import ACTIVATIONS, DEFAULT_RECIPE, RECIPES, Fp8Linear, set_activation, set_recipe
from backend.protocol import Finished, Generate, SamplingParams, Tokens, WorkerSettings
from loadtest.report import write_json

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile of seconds, in milliseconds."""
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p / 100))] * 1000, 3) if values else None


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    config = AutoConfig.from_pretrained(HERE / "models" / shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    del model
    torch.cuda.empty_cache()
    return out


class LatencyRecorder:
    """The engine's emit for the benchmarks: output tokens, finished requests, and time to first
    token and inter-token gaps of the requests `measured` accepts. `on_finished(rid)` runs under
    the recorder's lock (the closed loop submits the next request there)."""

    def __init__(self, measured=lambda rid: True, on_finished=lambda rid: None) -> None:
        self.lock = threading.Lock()
        self.measured, self.on_finished = measured, on_finished
        self.sent_at: dict[int, float] = {}
        self.last_at: dict[int, float] = {}
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = self.done = 0

    def sent(self, rid: int) -> None:
        self.sent_at[rid] = time.perf_counter()

    def emit(self, frames) -> None:
        now = time.perf_counter()
        with self.lock:
            for f in frames:
                if isinstance(f, Tokens):
                    self.tokens += len(f.token_ids)
                    if self.measured(f.id):
                        if f.id in self.last_at:
                            self.itl.append(now - self.last_at[f.id])
                        else:
                            self.ttft.append(now - self.sent_at[f.id])
                        self.last_at[f.id] = now
                elif isinstance(f, Finished):
                    self.done += 1
                    self.last_at.pop(f.id, None)
                    self.on_finished(f.id)

    def latencies(self) -> dict:
        return {"ttft_p50_ms": pct(self.ttft, 50), "ttft_p99_ms": pct(self.ttft, 99),
                "itl_p50_ms": pct(self.itl, 50), "itl_p99_ms": pct(self.itl, 99)}


def run_engine(engine: TransformersEngine, prompt: str, concurrency: int, total: int, new_tokens: int,
               temperature: float = 0.0) -> dict:
    """Closed loop: `concurrency` requests in flight until `total` are done (greedy, or sampled at
    `temperature` with a seed of their own)."""
    done = threading.Event()
    submitted = [0]

    def submit():
        rid = submitted[0]
        submitted[0] += 1
        rec.sent(rid)
        engine.submit(Generate(id=rid, prompt=prompt, params=SamplingParams(max_tokens=new_tokens,
                                                                             temperature=temperature, ignore_eos=True)))

    def finished(rid):
        if submitted[0] < total:
            submit()
        if rec.done == total:
            done.set()

    rec = LatencyRecorder(on_finished=finished)
    engine.emit = rec.emit
    before = host_anatomy(engine)
    started = time.perf_counter()
    with rec.lock:
        for _ in range(min(concurrency, total)):
            submit()
    with torch.inference_mode():
        while not done.is_set():
            engine.step()
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": total, "output_tokens": rec.tokens,
            "tokens_per_s": round(rec.tokens / wall, 1), "wall_s": round(wall, 3), **rec.latencies(),
            "host_ms": host_anatomy(engine, before, wall)}


def host_anatomy(engine: TransformersEngine, before: dict | None = None, wall: float = 0.0) -> dict:
    """The engine loop's host time by part (BatchEngine.host_seconds): a snapshot, or with
    `before` the milliseconds each part took in the run, in all and per decode step."""
    now = dict(engine.host_seconds, steps=engine.decode_steps)
    if before is None:
        return now
    steps = max(1, now["steps"] - before["steps"])
    spent = {k: now[k] - before[k] for k in engine.host_seconds}
    return {"decode_steps": steps, "wall_ms_per_step": round(wall * 1000 / steps, 3),
            "total_ms": {k: round(v * 1000, 1) for k, v in spent.items()},
            "per_step_ms": {k: round(v * 1000 / steps, 3) for k, v in spent.items()}}


def run_open_loop(engine: TransformersEngine, prompt: str, rate: float, seconds: float, new_tokens: int,
                  long_prompt: str = "", long_every_s: float = 0.0) -> dict:
    """Open loop: requests arrive at `rate` per second (evenly spaced) for `seconds`, whatever the
    engine's state; TTFT and inter-token latency percentiles of everything that arrived. With
    `long_prompt`, one request with it (8 new tokens) also arrives every `long_every_s`; the
    figures are then those of the short requests (the streams a long prefill would stall)."""
    total = int(rate * seconds)
    longs = int(seconds / long_every_s) if long_prompt and long_every_s else 0
    LONG = 1_000_000  # request ids of the long prompts start here
    finished = threading.Event()
    rec = LatencyRecorder(measured=lambda rid: rid < LONG,
                          on_finished=lambda rid: rec.done == total + longs and finished.set())

    def arrivals():
        begun = time.perf_counter()
        schedule = sorted([(rid / rate, rid) for rid in range(total)]
                          + [((k + 0.5) * long_every_s, LONG + k) for k in range(longs)])
        for at, rid in schedule:
            time.sleep(max(0.0, begun + at - time.perf_counter()))
            with rec.lock:
                rec.sent(rid)
            if rid >= LONG:
                engine.submit(Generate(id=rid, prompt=long_prompt, params=SamplingParams(max_tokens=8, temperature=0,
                                                                                          ignore_eos=True)))
            else:
                engine.submit(Generate(id=rid, prompt=prompt, params=SamplingParams(max_tokens=new_tokens,
                                                                                     temperature=0, ignore_eos=True)))

    engine.emit = rec.emit
    max_running = 0
    before = host_anatomy(engine)
    started = time.perf_counter()
    threading.Thread(target=arrivals, daemon=True).start()
    with torch.inference_mode():
        while not finished.is_set():
            engine.step()
            max_running = max(max_running, engine.load[0])
    wall = time.perf_counter() - started
    latencies = rec.latencies()
    return {"rate_rps": round(rate, 2), "requests": total, "long_prompts": longs, "prefill_budget": engine.prefill_budget,
            "tokens_per_s": round(rec.tokens / wall, 1), "max_running": max_running, **latencies,
            "itl_p99_over_p50": round(latencies["itl_p99_ms"] / latencies["itl_p50_ms"], 2),
            "host_ms": host_anatomy(engine, before, wall)}


def run_hf(model, prompt_ids: list[int], batch: int, new_tokens: int) -> dict:
    ids = torch.tensor([prompt_ids] * batch, device="cuda")
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=4, do_sample=False)  # warm
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    produced = (out.shape[1] - ids.shape[1]) * batch
    with torch.inference_mode():  # time to first token: the same batch, one new token
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
    ttft = time.perf_counter() - t
    return {"batch": batch, "tokens_per_s": round(produced / wall, 1), "ttft_ms": round(ttft * 1000, 3),
            "step_ms": round((wall - ttft) / max(1, new_tokens - 1) * 1000, 3)}


def step_breakdown(engine: TransformersEngine, batch: int, length: int = 256, steps: int = 50) -> dict:
    """GPU time of one captured decode step (CUDA events around graph replays) against the time
    the whole engine step takes at the same batch size (its inter-token latency): the difference
    is Python and launch overhead outside the graph (scheduling, sampling, detokenizing, frames)."""
    graph, _ = engine._graph(batch, length)
    # rows three quarters into the bucket (what the live-prefix kernel reads)
    engine._pos[:batch].fill_(length * 3 // 4)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / steps
    logits = torch.randn(batch, engine.vocab_size, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        logits.argmax(dim=-1).tolist()
    sample_ms = (time.perf_counter() - t) / steps * 1000
    windows = [[100, 200, 300, 400, 500, 600], [100, 200, 300, 400, 500, 600, 700]] * batch
    t = time.perf_counter()
    for _ in range(10):
        engine.detokenize_batch(windows)
    detok_ms = (time.perf_counter() - t) / 10 * 1000
    return {"batch": batch, "length_bucket": length, "graph_gpu_ms": round(gpu_ms, 3),
            "greedy_sample_and_sync_ms": round(sample_ms, 3), "batch_detokenize_ms": round(detok_ms, 3)}


def prefill_breakdown(engine: TransformersEngine, prompt: str, rows: int, profile: bool = False) -> dict:
    """Where a wave of `rows` arriving prompts spends its time before their first tokens: encoding
    them, the engine's whole batched prefill (forwards in groups, first tokens sampled and on the
    host), and one group's forward alone - the host's time to launch it against the GPU's time to
    run it (CUDA events): launch ≈ wall means the prefill is bound by the host, not the GPU. The
    whole prefill is timed as the engine runs it (in a captured graph where the rows fit one) and
    eagerly."""
    reqs = [Generate(id=20_000 + i, prompt=prompt, params=SamplingParams(max_tokens=8, temperature=0))
            for i in range(rows)]
    t = time.perf_counter()
    seqs = [engine._start(r, ids) for r, ids in zip(reqs, engine.encode_many(reqs))]
    encode_ms = (time.perf_counter() - t) * 1000
    result = {"rows": rows, "prompt_tokens": len(seqs[0].prompt_ids), "encode_ms": round(encode_ms, 3)}
    with torch.inference_mode():
        padded = engine.padded_prefill
        # the engine's prefill as it runs (padded into a captured graph where the rows fit one),
        # then with the padded graphs off
        for name, use_padded in (("prefill_wall_ms", padded), ("prefill_wall_eager_ms", False)):
            engine.padded_prefill = use_padded
            for _ in range(2):  # the second is measured (the first may allocate)
                torch.cuda.synchronize()
                t = time.perf_counter()
                engine.prefill(seqs)
                result[name] = round((time.perf_counter() - t) * 1000, 3)
                engine.release(seqs)
        engine.padded_prefill = padded
        group = seqs[:max(1, PREFILL_TOKEN_BUDGET // len(seqs[0].prompt_ids))]
        for s in group:
            engine.reserve(s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            start.record()
            engine._prefill_logits(group)
            end.record()
            launched = time.perf_counter() - t
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        result.update(group_rows=len(group), group_launch_ms=round(launched * 1000, 3),
                      group_wall_ms=round(wall * 1000, 3), group_gpu_ms=round(start.elapsed_time(end), 3))
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine._prefill_logits(group)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), file=sys.stderr, flush=True)
        engine.release(group)
    return result


def gumbel_sample_before(logits, temperature, top_p, uniform, any_sampled, any_top_p):
    """The sampler the engine used before inverse-transform sampling (Gumbel-max with a hashed
    noise value per row and token; top-p left out), kept here only for the side by side. It takes
    sampling.sample's arguments and hashes each row's number with every token id, the same work per
    step as before."""
    def mix(x):  # splitmix64's finaliser on int64 (logical shifts emulated), as the old sampler hashed
        x = x ^ ((x >> 30) & ((1 << 34) - 1))
        x = x * -4658895280553007687
        x = x ^ ((x >> 27) & ((1 << 37) - 1))
        x = x * -7723592293110705685
        return x ^ ((x >> 31) & ((1 << 33) - 1))

    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    logprobs = torch.log_softmax(logits.float() / temperature.clamp_min(1e-6)[:, None], dim=-1)
    keys = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64) * -7723592293110705685
    base = mix((uniform.double() * float(1 << 53)).long())
    bits = mix(base[:, None] + keys[None, :])
    noise = (((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) / float(1 << 53)
    sampled = (logprobs + (-torch.log(-torch.log(noise))).to(logprobs.dtype)).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def sampling_check(engine: TransformersEngine, prompt: str, rows: int, new_tokens: int) -> dict:
    """The engine's sampler (inverse transform, one number per row) against the one before it
    (Gumbel-max, a number per row and token), in one process: GPU time per call at `rows` rows
    (temperature 0.7, no top-p; and with top-p 0.9), and the closed loop at `rows` concurrent
    sampled at temperature 0.7 with each, next to the greedy closed loop."""
    from backend import sampling

    current = sampling.sample
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn((rows, engine.vocab_size), generator=gen, device="cuda").to(engine.dtype)
    temperature = torch.full((rows,), 0.7, device="cuda")
    uniform = torch.from_numpy(sampling.row_uniform(torch.randint(0, 2**62, (rows,), generator=gen).tolist(),
                                                    [5] * rows)).to("cuda")
    result = {"rows": rows}
    with torch.inference_mode():
        for name, fn, top_p in (("inverse_transform", current, 1.0), ("inverse_transform_top_p", current, 0.9),
                                ("gumbel_before", gumbel_sample_before, 1.0)):
            tops = torch.full((rows,), top_p, device="cuda")
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn(logits, temperature, tops, uniform, True, top_p < 1)
            torch.cuda.synchronize()
            start.record()
            for _ in range(20):
                fn(logits, temperature, tops, uniform, True, top_p < 1)
            end.record()
            torch.cuda.synchronize()
            result[f"{name}_gpu_ms"] = round(start.elapsed_time(end) / 20, 3)
    keys = ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")
    greedy = run_engine(engine, prompt, rows, 4 * rows, new_tokens)
    result["greedy_closed_loop"] = {k: greedy[k] for k in keys}
    try:
        for name, fn in (("inverse_transform", current), ("gumbel_before", gumbel_sample_before)):
            sampling.sample = fn  # the engine calls sampling.sample
            run = run_engine(engine, prompt, rows, 4 * rows, new_tokens, temperature=0.7)
            result[f"{name}_closed_loop"] = {k: run[k] for k in keys}
    finally:
        sampling.sample = current
    return result


def decode_profile(engine: TransformersEngine, batch: int, length: int = 256) -> dict:
    """Where one decode step's GPU time goes, by kind of kernel: torch.profiler over an eager
    decode forward at `batch` rows (the captured graph runs the same kernels), summed into matrix
    products (with their achieved TFLOP/s against the step's weight FLOPs), attention, and the
    rest; prints the busiest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine._pos[:batch].fill_(length * 3 // 4)
    with torch.inference_mode():
        for _ in range(2):
            engine._decode_forward(batch, length)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._decode_forward(batch, length)
            torch.cuda.synchronize()
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = event.self_cuda_time_total
        if not us or event.key.startswith(("aten::", "cuda", "Memcpy")):
            continue
        name = event.key.lower()
        if any(t in name for t in ("flash", "fmha", "attention", "attn", "softmax")):  # before: fmha_cutlass...
            kinds["attention"] += us
        elif any(t in name for t in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
            kinds["matmul"] += us
        else:
            kinds["other"] += us
    # multiply-adds of the step's weights: every linear layer once per row (embeddings are a lookup)
    linear_params = sum(m.weight.numel() for m in engine.model.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear)))
    flops = 2 * linear_params * batch
    result = {"batch": batch, "length_bucket": length, **{f"{k}_ms": round(v / 1000, 3) for k, v in kinds.items()},
              "linear_tflop": round(flops / 1e12, 3)}
    if kinds["matmul"]:
        result["matmul_tflops"] = round(flops / (kinds["matmul"] / 1e6) / 1e12, 1)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
    print(table, file=sys.stderr, flush=True)
    return result


GREEDY_PROMPTS = ["Hello there", " word" * 20, "1 2 3 4 5"]


def set_step_mode(engine: TransformersEngine, attention: bool, fused: bool) -> None:
    """Switch the decode step's variant and capture its graphs before it is measured."""
    engine.live_prefix_attention = attention
    if fused:
        engine.fused.apply()
    else:
        engine.fused.restore()
    engine.warm_up()


def greedy_check(engine: TransformersEngine, prompts: list[str], n: int) -> list[dict]:
    results = []
    for i, prompt in enumerate(prompts):
        frames = []
        engine.emit = frames.extend
        engine.submit(Generate(id=10_000 + i, prompt=prompt, params=SamplingParams(max_tokens=n, temperature=0,
                                                                                   ignore_eos=True)))
        with torch.inference_mode():
            while not any(isinstance(f, Finished) for f in frames):
                engine.step()
        ours = [t for f in frames if isinstance(f, Tokens) for t in f.token_ids]
        results.append({"prompt": prompt[:40], "tokens": n, **against_hf(engine, prompt, n, ours)})
    return results


def against_hf(engine: TransformersEngine, prompt: str, n: int, ours: list[int]) -> dict:
    """`ours` (n greedy tokens after `prompt`) against HF generate's, on transformers' own layers."""
    ids = torch.tensor([engine.tokenizer(prompt).input_ids], device="cuda")
    with engine.fused.paused(), torch.inference_mode():
        ref = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    same = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    return {"identical": ours == ref, "first_divergence": same}


def greedy_joining_check(engine: TransformersEngine, prompts: list[str], n: int) -> dict:
    """Greedy output with rows joining a running batch: the first prompt starts alone, the others
    arrive a few steps later (prefilled beside its decode steps where the engine does that); each
    row's tokens against HF generate's."""
    frames, beside = [], []
    engine.emit = frames.extend
    reqs = [Generate(id=20_000 + i, prompt=p, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    with torch.inference_mode():
        engine.submit(reqs[0])
        for _ in range(4):
            engine.step()
        for r in reqs[1:]:
            engine.submit(r)
        while sum(isinstance(f, Finished) for f in frames) < len(reqs):
            engine.step()
            beside.append(engine._joining is not None)
    rows = []
    for r in reqs:
        ours = [t for f in frames if isinstance(f, Tokens) and f.id == r.id for t in f.token_ids]
        rows.append({"prompt": r.prompt[:40], **against_hf(engine, r.prompt, n, ours)})
    return {"overlap_prefill": engine.overlap_prefill, "prefilled_beside": any(beside), "prompts": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_gpu", description=__doc__)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-batches", default="1,16,64,256")
    p.add_argument("--compare-pipeline", action="store_true",
                   help="run each concurrency with the host/GPU overlap off, then on")
    p.add_argument("--compare-step", action="store_true",
                   help="run each concurrency with the plain decode step (SDPA over the length bucket, "
                        "transformers' op-by-op layers), then with the fused pieces (the default), then "
                        "also with the live-prefix attention kernel")
    p.add_argument("--open-loop", type=float, default=0.0,
                   help="also: arrivals at this fraction of the closed-loop rate (at --open-concurrency), "
                        "with chunked prefill off and at each --prefill-budgets")
    p.add_argument("--open-concurrency", default="",
                   help="open loop: the closed-loop concurrencies whose rate it takes (comma-separated; default the largest)")
    p.add_argument("--prefill-budgets", default="512,2048")
    p.add_argument("--prefill-waits", default="0",
                   help="open loop: each run with arrivals waiting up to this many ms for company (comma-separated)")
    p.add_argument("--open-seconds", type=float, default=15.0)
    p.add_argument("--overlap-prefill", default="1",
                   help="open loop: arrivals prefilled beside the decode steps (1), between them (0), or both (0,1)")
    p.add_argument("--skip-hf", action="store_true", help="leave out plain HF generate")
    p.add_argument("--long-prompt-tokens", type=int, default=0,
                   help="open loop: also one prompt of this many tokens every --long-every seconds")
    p.add_argument("--long-every", type=float, default=1.0)
    p.add_argument("--prefill-rows", default="",
                   help="also: where a wave of this many arriving prompts spends its time (comma-separated row counts)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="with --prefill-rows: print torch.profiler's busiest ops of one prefill group")
    p.add_argument("--profile-decode", action="store_true",
                   help="one eager decode step at the largest concurrency, its GPU time by kind of kernel")
    p.add_argument("--reuse-models", action="store_true",
                   help="build each shape's random weights where loadtest.gpu_config keeps them (/tmp/m...), "
                        "or use them from there, so a served run after this one does not build them again")
    p.add_argument("--sampling-check", action="store_true",
                   help="also: the sampler against the one before it (GPU time per call; closed loops greedy and at 0.7)")
    p.add_argument("--greedy-variants", action="store_true",
                   help="only: greedy output against HF generate with the fused pieces and the padded prefill "
                        "graphs each on and off")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--dtype", default="auto", help="the engine's dtype (WorkerSettings.dtype): auto, fp8, ...")
    p.add_argument("--fp8-recipe", default=DEFAULT_RECIPE, choices=RECIPES,
                   help="with --dtype fp8: how the float8 products are computed (backend/fp8.py RECIPES)")
    p.add_argument("--fp8-activation", default="fused", choices=ACTIVATIONS,
                   help="with --dtype fp8: how a gated MLP's activation is quantised for down (backend/fp8.py ACTIVATIONS)")
    p.add_argument("--dynamic-widths", action="store_true",
                   help="compile the fused pieces with every size dynamic, as before backend/compiling.py "
                        "made the widths static (to measure one against the other)")
    p.add_argument("--torch-layer-pieces", action="store_true",
                   help="the rotary embedding and the KV-cache write as torch code (compiled / index_put), "
                        "not backend/layer_kernels.py's Triton kernels (to measure one against the other)")
    p.add_argument("--out", default="reports/bench-gpu.json")
    args = p.parse_args(argv)
    compiling.all_sizes_dynamic = args.dynamic_widths
    layer_kernels.enabled = not args.torch_layer_pieces
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
               "fp8_recipe": args.fp8_recipe if args.dtype == "fp8" else None,
               "fp8_activation": args.fp8_activation if args.dtype == "fp8" else None,
               "compiled_sizes": "all dynamic" if args.dynamic_widths else "rows dynamic",
               "rotary_and_kv_write": "torch" if args.torch_layer_pieces else "layer_kernels",
               "transformers": __import__("transformers").__version__, "shapes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="fullpower-gpu-"))
    for shape in args.shapes.split(","):
        if args.reuse_models:
            from loadtest.gpu_config import built_model

            model_dir = built_model(shape, args.tokenizer)
        else:
            model_dir = build_model(shape, args.tokenizer, tmp / shape)
        concurrency = [int(c) for c in args.concurrency.split(",")]
        settings = WorkerSettings(engine="transformers", model_name=shape, model_path=str(model_dir), device="cuda:0",
                                  max_batch_size=max(concurrency), max_context=args.max_context, verify_manifest=False,
                                  dtype=args.dtype)
        t0 = time.perf_counter()
        engine = TransformersEngine(settings)
        if args.dtype == "fp8" and args.fp8_recipe != DEFAULT_RECIPE:
            print(f"fp8 recipe {args.fp8_recipe}: {set_recipe(engine.model, args.fp8_recipe, engine.use_graphs)} layers",
                  file=sys.stderr, flush=True)
        if args.dtype == "fp8" and args.fp8_activation != "fused":
            print(f"fp8 activation {args.fp8_activation}: "
                  f"{set_activation(engine.model, args.fp8_activation, engine.use_graphs)} MLPs", file=sys.stderr, flush=True)
        engine.warm_up()
        boot = time.perf_counter() - t0
        prompt = " word" * 128
        n_prompt = len(engine.tokenizer(prompt).input_ids)
        entry = {"boot_s": round(boot, 1), "prompt_tokens": n_prompt, "slots": engine.max_batch_size,
                 "graphs": len(engine._graphs), "engine": [], "hf_generate": []}
        # the decode step's variants: what this engine does by default, and with --compare-step
        # also without the fused pieces and with the live-prefix attention kernel (same process)
        default = (engine.live_prefix_attention, engine.fused.active)
        modes = [default]
        if args.compare_step and default[1] and decode_attention.available(engine.device, engine.dtype):
            modes = [(False, False), (False, True), (True, True)]
        entry["step_modes"] = [{"live_prefix_attention": a, "fused_pieces": f} for a, f in modes]
        entry["greedy_vs_hf"] = []
        if args.greedy_variants:
            # which part of the default engine moves greedy output, if any: the fused pieces and the
            # padded prefill graphs, each on and off
            for fused in (True, False):
                for padded in (True, False):
                    set_step_mode(engine, False, fused)
                    engine.padded_prefill = padded and bool(engine._prefill_graphs)
                    entry["greedy_vs_hf"].append({"fused_pieces": fused, "padded_prefill": engine.padded_prefill,
                                                  "prompts": greedy_check(engine, GREEDY_PROMPTS, 32)})
                    print(shape, "greedy", entry["greedy_vs_hf"][-1], file=sys.stderr, flush=True)
            results["shapes"][shape] = entry
            del engine
            torch.cuda.empty_cache()
            continue
        for attention, fused in modes:
            set_step_mode(engine, attention, fused)
            entry["greedy_vs_hf"].append({"live_prefix_attention": attention, "fused_pieces": fused,
                                          "prompts": greedy_check(engine, GREEDY_PROMPTS, 32)})
            print(shape, "greedy", entry["greedy_vs_hf"][-1], file=sys.stderr, flush=True)
        for c in concurrency:
            for attention, fused in modes:
                set_step_mode(engine, attention, fused)
                for pipelined in ((False, True) if args.compare_pipeline else (True,)):
                    engine.pipeline = pipelined  # host/GPU overlap off, then on, in the same process
                    result = run_engine(engine, prompt, c, max(4 * c, 8), args.new_tokens)
                    result.update(pipelined=pipelined, live_prefix_attention=attention, fused_pieces=fused)
                    entry["engine"].append(result)
                    print(shape, entry["engine"][-1], file=sys.stderr, flush=True)
        set_step_mode(engine, *default)
        if args.open_loop:
            entry["open_loop"] = []
            bases = [int(c) for c in args.open_concurrency.split(",") if c] or [max(concurrency)]
            for base in bases:  # each at open_loop x the closed loop's rate at that concurrency
                top = max((r for r in entry["engine"] if r["concurrency"] == base), key=lambda r: r["tokens_per_s"])
                rate = args.open_loop * top["tokens_per_s"] / args.new_tokens
                for budget in [0] + [int(b) for b in args.prefill_budgets.split(",") if b]:
                    for wait_ms in [float(w) for w in args.prefill_waits.split(",") if w]:
                        for overlap in [bool(int(o)) for o in args.overlap_prefill.split(",") if o]:
                            engine.prefill_budget = budget  # chunked prefill off, then on, in the same process
                            engine.prefill_wait_s = wait_ms / 1000  # likewise arrivals waiting for company
                            engine.overlap_prefill = overlap and engine._side_stream is not None  # and beside
                            long_prompt = " word" * args.long_prompt_tokens
                            result = run_open_loop(engine, prompt, rate, args.open_seconds, args.new_tokens,
                                                   long_prompt, args.long_every)
                            entry["open_loop"].append(dict(result, closed_loop_concurrency=base, prefill_wait_ms=wait_ms,
                                                           overlap_prefill=engine.overlap_prefill))
                            print(shape, "open loop", entry["open_loop"][-1], file=sys.stderr, flush=True)
            engine.overlap_prefill = engine._side_stream is not None
            entry["greedy_vs_hf_joining"] = greedy_joining_check(engine, GREEDY_PROMPTS, 32)
            print(shape, "greedy joining", entry["greedy_vs_hf_joining"], file=sys.stderr, flush=True)
            engine.prefill_wait_s = 0.0
            engine.prefill_budget = 16  # greedy equality with prompts prefilled in several chunks
            entry["greedy_vs_hf_chunked"] = greedy_check(engine, GREEDY_PROMPTS, 32)
            print(shape, "greedy chunked", entry["greedy_vs_hf_chunked"], file=sys.stderr, flush=True)
            engine.prefill_budget = 0
        entry["step_breakdown"] = []
        for attention, fused in modes:
            set_step_mode(engine, attention, fused)
            entry["step_breakdown"].append(dict(step_breakdown(engine, max(concurrency)),
                                                live_prefix_attention=attention, fused_pieces=fused))
            print(shape, "breakdown", entry["step_breakdown"][-1], file=sys.stderr, flush=True)
        set_step_mode(engine, *default)
        # the two extras below report an error of their own rather than lose the run's other figures
        if args.profile_decode:
            try:
                entry["decode_profile"] = decode_profile(engine, max(concurrency))
            except Exception as exc:  # noqa: BLE001
                entry["decode_profile"] = repr(exc)
            print(shape, "decode profile", entry["decode_profile"], file=sys.stderr, flush=True)
        if args.sampling_check:
            try:
                entry["sampling_check"] = sampling_check(engine, prompt, max(concurrency), args.new_tokens)
            except Exception as exc:  # noqa: BLE001
                entry["sampling_check"] = repr(exc)
            print(shape, "sampling", entry["sampling_check"], file=sys.stderr, flush=True)
        entry["prefill_breakdown"] = []
        for rows in [int(r) for r in args.prefill_rows.split(",") if r]:
            entry["prefill_breakdown"].append(prefill_breakdown(engine, prompt, min(rows, engine.max_batch_size),
                                                                args.profile_prefill))
            print(shape, "prefill", entry["prefill_breakdown"][-1], file=sys.stderr, flush=True)
        prompt_ids = engine.tokenizer(prompt).input_ids
        engine.fused.restore()  # plain HF generate: transformers' own layers
        for b in [int(x) for x in args.hf_batches.split(",") if x and not args.skip_hf]:
            entry["hf_generate"].append(run_hf(engine.model, prompt_ids, b, args.new_tokens))
            print(shape, "hf", entry["hf_generate"][-1], file=sys.stderr, flush=True)
        results["shapes"][shape] = entry
        del engine
        torch.cuda.empty_cache()
    return write_json(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
