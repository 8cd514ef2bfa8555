#!/usr/bin/env bash
# Served against the engine alone, per model shape, in one lease (issue 18's "through fullpower
# serve >= 95% of the engine alone"): for each shape in SHAPES (default smollm2-135m llama-3.2-1b),
# the engine alone (closed loop of 256 greedy, the sampler's check: its GPU time against the one
# before it and the closed loop sampled at 0.7; with PROFILE=1 one decode step's GPU time by kind of
# kernel; SAMPLING=0 leaves the sampler's check out), then `fullpower serve` with 256 streams at each
# temperature in TEMPS (default "0 0.7"; TEMPS="" serves nothing). ALONE=0 skips the engine alone (a
# lease that measured it in an earlier command).
# The random weights are built once per shape (where gpu_config keeps them) and shared by both.
# DTYPE (default auto) is the engine's and the pool's dtype (fp8: backend/fp8.py); other than auto it
# is added to the files' names, as are FP8_RECIPE and FP8_ACTIVATION (engine alone only: bench_gpu
# --fp8-recipe, --fp8-activation) where set; DYNAMIC_WIDTHS=1 (engine alone only: bench_gpu
# --dynamic-widths) compiles the fused pieces with every size dynamic and adds -dynamic-widths;
# TORCH_LAYER_PIECES=1 (engine alone only: bench_gpu --torch-layer-pieces) keeps the rotary and the
# KV-cache write in torch instead of backend/layer_kernels.py and adds -torch-layer-pieces. Needs .gpu/ as gpu_scale.sh does. Writes bench-gpu-shapes-<shape>.json/.log
# and served-shapes-<shape>.jsonl (one line per served run) into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh > /dev/null
SERVED=/tmp/served-shapes
mkdir -p $SERVED
export DTYPE=${DTYPE:-auto}  # gpu_scale.sh (served_run) reads it too
for SHAPE in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
  extra=""
  [ "${PROFILE:-0}" = 1 ] && extra="--profile-decode"
  [ "${SAMPLING:-1}" = 1 ] && extra="$extra --sampling-check"
  name=$SHAPE
  [ "$DTYPE" != auto ] && name="$SHAPE-$DTYPE"
  if [ -n "${FP8_RECIPE:-}" ]; then extra="$extra --fp8-recipe $FP8_RECIPE"; name="$name-$FP8_RECIPE"; fi
  if [ -n "${FP8_ACTIVATION:-}" ]; then extra="$extra --fp8-activation $FP8_ACTIVATION"; name="$name-$FP8_ACTIVATION"; fi
  if [ "${DYNAMIC_WIDTHS:-0}" = 1 ]; then extra="$extra --dynamic-widths"; name="$name-dynamic-widths"; fi
  if [ "${TORCH_LAYER_PIECES:-0}" = 1 ]; then extra="$extra --torch-layer-pieces"; name="$name-torch-layer-pieces"; fi
  [ "${ALONE:-1}" = 1 ] && timeout ${ALONE_TIMEOUT:-240} python3 -m loadtest.bench_gpu --tokenizer .gpu/tokenizer --shapes "$SHAPE" \
    --concurrency 256 --new-tokens 128 --hf-batches "" --prefill-budgets "" --reuse-models $extra \
    --dtype "$DTYPE" --out "$OUT/bench-gpu-shapes-$name.json" 2> "$OUT/bench-gpu-shapes-$name.log" > /dev/null
  if [ "${ALONE:-1}" = 1 ]; then
    grep -E "greedy|sampling|decode profile|'tokens_per_s'" "$OUT/bench-gpu-shapes-$name.log" | cut -c1-600
    tail -2 "$OUT/bench-gpu-shapes-$name.log" | cut -c1-300
  fi
  for temp in ${TEMPS-0 0.7}; do  # TEMPS="" (set, empty): no served run
    tag="t$temp"
    [ "$DTYPE" != auto ] && tag="t$temp-$DTYPE"
    served_run "$SHAPE" 1 "$temp" $SERVED "$tag" "$OUT/served-shapes-$name.jsonl" shape="$SHAPE" temperature="$temp" dtype="$DTYPE"
    tail -5 "$SERVED/serve-$SHAPE-$tag.log" | cut -c1-300
  done
done
