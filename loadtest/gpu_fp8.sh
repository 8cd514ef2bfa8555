#!/usr/bin/env bash
# fp8 against bfloat16, engine alone, in one lease (docs/benchmarks.md section 18): for each shape in
# SHAPES (default llama-3.1-8b) and each dtype in DTYPES (default "fp8 auto"; auto is bfloat16 on
# the GPU), loadtest.bench_gpu's closed loop of 256 greedy streams (128 in / 128 out), the greedy
# check against HF generate on the same weights, and one decode step's GPU time by kind of kernel
# (--profile-decode). The random weights are built once per shape and shared (--reuse-models).
# With SERVED=1, then `fullpower serve` at fp8 with 256 greedy streams (served_run, gpu_env.sh).
# Needs .gpu/ as gpu_scale.sh does. Writes bench-gpu-fp8-<shape>-<dtype>.json/.log (and
# served-fp8-<shape>.jsonl) into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh > /dev/null
for SHAPE in ${SHAPES:-llama-3.1-8b}; do
  for DTYPE in ${DTYPES:-fp8 auto}; do
    timeout ${ALONE_TIMEOUT:-280} python3 -m loadtest.bench_gpu --tokenizer .gpu/tokenizer --shapes "$SHAPE" \
      --concurrency 256 --new-tokens 128 --hf-batches "" --prefill-budgets "" --reuse-models --profile-decode \
      --dtype "$DTYPE" --out "$OUT/bench-gpu-fp8-$SHAPE-$DTYPE.json" 2> "$OUT/bench-gpu-fp8-$SHAPE-$DTYPE.log" > /dev/null
    echo "== $SHAPE $DTYPE"
    grep -E "greedy|decode profile|'tokens_per_s'" "$OUT/bench-gpu-fp8-$SHAPE-$DTYPE.log" | cut -c1-500
    tail -2 "$OUT/bench-gpu-fp8-$SHAPE-$DTYPE.log" | cut -c1-300
  done
  if [ "${SERVED:-0}" = 1 ]; then
    export DTYPE=fp8
    served_run "$SHAPE" 1 0 /tmp/served-fp8 "t0-fp8" "$OUT/served-fp8-$SHAPE.jsonl" shape="$SHAPE" temperature=0 dtype=fp8
    tail -5 "/tmp/served-fp8/serve-$SHAPE-t0-fp8.log" | cut -c1-300
  fi
done
