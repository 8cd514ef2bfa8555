#!/usr/bin/env bash
# fp8 against bfloat16 in one lease (docs/benchmarks.md section 18): for each dtype in DTYPES (default
# "fp8 auto"; auto is bfloat16 on the GPU), gpu_shapes.sh's engine alone for each shape in SHAPES
# (default llama-3.1-8b) with one decode step's profile and no sampler's check; with SERVED=1 also
# `fullpower serve` for each dtype at each temperature in SERVED_TEMPS (default 0). Files as gpu_shapes.sh names them
# (bench-gpu-shapes-<shape>[-<dtype>].json, served-shapes-<shape>[-<dtype>].jsonl).
set -u
# DTYPES may name an fp8 recipe and activation as fp8:<recipe>[:<activation>] (backend/fp8.py RECIPES:
# row, row-fast, tensor; ACTIVATIONS: fused, split), e.g. DTYPES="fp8 fp8:row:split auto".
for dtype in ${DTYPES:-fp8 auto}; do
  temps=""
  [ "${SERVED:-0}" = 1 ] && temps=${SERVED_TEMPS:-0}
  recipe="" activation=""
  case $dtype in fp8:*) IFS=: read -r _ recipe activation <<< "$dtype"; dtype=fp8 ;; esac
  DTYPE=$dtype FP8_RECIPE=$recipe FP8_ACTIVATION=$activation PROFILE=1 SAMPLING=0 TEMPS="$temps" SHAPES="${SHAPES:-llama-3.1-8b}" \
    ALONE_TIMEOUT=${ALONE_TIMEOUT:-280} bash loadtest/gpu_shapes.sh
done
