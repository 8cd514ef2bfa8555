#!/usr/bin/env bash
# Proxy CPU per streamed token on a GPU host: `fullpower serve` with one GPU worker (the 135M
# shape, random weights), 256 concurrent streams of 128 tokens for 20 s, measured with
# loadtest.bench_stream against each tree given (default: this one). Needs, carried in .gpu/:
# wheels/ (msgspec, cachetools, diskcache, aiohttp, httptools for the host's Python) and tokenizer/ (the
# embedded model's tokenizer files). Writes stream-*.json into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh
python3 -m loadtest.gpu_config --gpus 1 --out /tmp/gpu.yaml
ROOT=$(pwd)
for spec in ${TREES:-after=.}; do
  name=${spec%%=*}; tree=${spec#*=}
  cd "$ROOT/$tree"
  python3 -m proxy serve --config /tmp/gpu.yaml > "$OUT/serve-$name.log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 360); do
    curl -sf http://127.0.0.1:18080/readyz >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "serve ($name) exited:"; tail -5 "$OUT/serve-$name.log"; break; }
    sleep 0.5
  done
  for round in ${ROUNDS:-1}; do
    python3 -m loadtest.bench_stream --url http://127.0.0.1:18080 --pid $SERVER --model m135 --streams 256 \
      --duration ${DURATION:-20} --tokens 128 --out "$OUT/stream-$name-$round.json" | tr -d '\n'; echo
  done
  kill -TERM $SERVER; wait $SERVER
  cd "$ROOT"
done
