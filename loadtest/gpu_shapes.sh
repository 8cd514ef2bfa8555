#!/usr/bin/env bash
# Served against the engine alone, per model shape, in one lease (issue 18's "through fullpower
# serve >= 95% of the engine alone"): for each shape in SHAPES (default smollm2-135m llama-3.2-1b),
# the engine alone (closed loop of 256 greedy, the sampler's check: its GPU time against the one
# before it and the closed loop sampled at 0.7; with PROFILE=1 one decode step's GPU time by kind of
# kernel), then `fullpower serve` with 256 streams at each temperature in TEMPS (default "0 0.7").
# The random weights are built once per shape (where gpu_config keeps them) and shared by both.
# Needs .gpu/ as gpu_scale.sh does. Writes bench-gpu-shapes-<shape>.json/.log and
# served-shapes-<shape>.jsonl (one line per served run) into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh > /dev/null
SERVED=/tmp/served-shapes
mkdir -p $SERVED
for SHAPE in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
  extra=""
  [ "${PROFILE:-0}" = 1 ] && extra="--profile-decode"
  timeout ${ALONE_TIMEOUT:-240} python3 -m loadtest.bench_gpu --tokenizer .gpu/tokenizer --shapes "$SHAPE" \
    --concurrency 256 --new-tokens 128 --hf-batches "" --prefill-budgets "" --reuse-models --sampling-check $extra \
    --out "$OUT/bench-gpu-shapes-$SHAPE.json" 2> "$OUT/bench-gpu-shapes-$SHAPE.log" > /dev/null
  grep -E "greedy|sampling|decode profile|'tokens_per_s'" "$OUT/bench-gpu-shapes-$SHAPE.log" | cut -c1-600
  tail -2 "$OUT/bench-gpu-shapes-$SHAPE.log" | cut -c1-300
  for temp in ${TEMPS:-0 0.7}; do
    OUT=$SERVED OVERLAP_PREFILL=1 TEMPERATURE=$temp GPUS=1 CLIENTS_PER_GPU=8 DURATION=${DURATION:-12} SHAPES=$SHAPE \
      timeout ${SERVED_TIMEOUT:-150} bash loadtest/gpu_scale.sh
    pkill -f 'proxy serv[e]'; sleep 1
    for f in $SERVED/*-"$SHAPE"-1.*; do mv "$f" "${f%-1.*}-t$temp.${f##*.}"; done
    # the run's figures and anatomy on one line, kept in $OUT as they come (a cut run keeps them)
    python3 - "$SERVED" "$temp" "$SHAPE" >> "$OUT/served-shapes-$SHAPE.jsonl" <<'PY'
import json, sys
d, temp, shape = sys.argv[1:]
row = {"shape": shape, "temperature": float(temp)}
for name in ("scale", "anatomy"):
    try:
        row[name] = json.load(open(f"{d}/{name}-{shape}-t{temp}.json"))
    except (OSError, ValueError) as exc:
        row[name] = repr(exc)
print(json.dumps(row))
PY
    tail -5 "$SERVED/serve-$SHAPE-t$temp.log" | cut -c1-300
  done
done
