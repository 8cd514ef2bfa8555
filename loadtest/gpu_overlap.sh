#!/usr/bin/env bash
# Arrivals prefilled beside the decode steps (pool setting overlap_prefill), measured on one GPU in
# one lease: the engine alone (closed loop at 256; open loop at 80% of its rate with arrivals
# prefilled between decode steps, then beside them; greedy output against HF generate with rows
# joining a running batch; the sampler's check against the one before it), then `fullpower serve` with 256 greedy
# streams (temperature 0, as the engine-alone runs) with overlap_prefill off, then on, and a
# sampled run (temperature 0.7) with it on if time is left. Needs .gpu/ as gpu_scale.sh does.
# Writes bench-gpu-overlap-<shape>.json, served-overlap-<shape>.jsonl (one line per served run)
# and served-overlap-<shape>.tgz (gpu_scale.sh's files per run) into ${OUT:-reports}. SHAPE defaults to smollm2-135m.
set -u
source loadtest/gpu_env.sh > /dev/null
SHAPE=${SHAPE:-smollm2-135m}
START=$SECONDS
timeout 290 python3 -m loadtest.bench_gpu --tokenizer .gpu/tokenizer --shapes "$SHAPE" --concurrency 256 \
  --new-tokens 128 --hf-batches "" --prefill-budgets "" --open-loop 0.8 --open-concurrency 256 \
  --prefill-waits 0 --overlap-prefill 0,1 --open-seconds 8 --sampling-check \
  --out "$OUT/bench-gpu-overlap-$SHAPE.json" 2> "$OUT/bench-gpu-overlap-$SHAPE.log" > /dev/null
grep -E "open loop|greedy|sampling|'tokens_per_s'" "$OUT/bench-gpu-overlap-$SHAPE.log" | cut -c1-700
tail -3 "$OUT/bench-gpu-overlap-$SHAPE.log" | cut -c1-400
SERVED=/tmp/served-overlap
mkdir -p $SERVED
served() {  # overlap_prefill (1 or 0), temperature
  SERVED_TIMEOUT=110 served_run "$SHAPE" "$1" "$2" $SERVED "overlap$1-t$2" "$OUT/served-overlap-$SHAPE.jsonl" \
    overlap_prefill=$([ "$1" = 1 ] && echo true || echo false) temperature="$2"
}
served 0 0
served 1 0
[ $((SECONDS - START)) -lt 430 ] && served 1 0.7
tar czf "$OUT/served-overlap-$SHAPE.tgz" -C $SERVED .
