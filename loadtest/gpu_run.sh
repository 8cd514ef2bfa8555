#!/usr/bin/env bash
# The GPU benchmark as run on the H200 host (see docs/benchmarks.md). Needs, carried in .gpu/:
# wheels/ (msgspec, cachetools, diskcache for the host's Python) and tokenizer/ (the embedded
# model's tokenizer files). Writes into ${OUT:-reports}.
set -u
OUT=${OUT:-reports}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --root-user-action=ignore .gpu/wheels/*.whl 2>&1 | tail -3
python3 -c "import msgspec, cachetools, diskcache; print('carried wheels ok')"
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# 1. The engine against HF generate, both shapes, in one process.
timeout 420 python3 -m loadtest.bench_gpu --tokenizer .gpu/tokenizer --out "$OUT/bench-gpu.json" \
  ${BENCH_GPU_ARGS:-} 2>&1 | tail -40

# 2. Through the proxy: fullpower serve with one GPU worker (135M shape), 256 concurrent streams.
python3 -m loadtest.gpu_config --gpus 1 --out /tmp/gpu.yaml
python3 -m proxy serve --config /tmp/gpu.yaml > "$OUT/serve.log" 2>&1 &
SERVER=$!
for i in $(seq 1 240); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
python3 -m loadtest --url http://127.0.0.1:18080 --model m135 --mode closed \
  --concurrency 256 --duration 20 --prompt-words 100-100 --max-tokens 128-128 --stream-share 1.0 \
  --out "$OUT" --name proxy-256 --no-plots --quiet 2>&1 | tail -8
kill -TERM $SERVER; wait $SERVER
tail -5 "$OUT/serve.log"
