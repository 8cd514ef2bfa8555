#!/usr/bin/env bash
# Proxy CPU per streamed token on a GPU host: `fullpower serve` with one GPU worker (the 135M
# shape, random weights), 256 concurrent streams of 128 tokens for 20 s, measured with
# loadtest.bench_stream against each tree given (default: this one). Needs, carried in .gpu/:
# wheels/ (msgspec, cachetools, diskcache, aiohttp for the host's Python) and tokenizer/ (the
# embedded model's tokenizer files). Writes stream-*.json into ${OUT:-reports}.
set -u
OUT=${OUT:-reports}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-compile --root-user-action=ignore --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L
python3 - <<'PY'
import json
from pathlib import Path
from loadtest.bench_gpu import build_model
build_model("smollm2-135m", Path(".gpu/tokenizer"), Path("/tmp/m135"))
Path("/tmp/gpu.yaml").write_text(json.dumps({
    "listen": "127.0.0.1:18080", "admin_listen": "127.0.0.1:19091", "data_dir": "/tmp/fpdata", "log_level": "warning",
    "pools": [{"name": "main", "model": "m135", "model_path": "/tmp/m135", "devices": ["cuda:0"],
               "max_batch_size": 256, "max_inflight_per_worker": 512, "max_context": 512, "verify_manifest": False}],
    "tiers": [{"name": "standard", "pool": "main", "max_concurrent": 512, "max_queue": 1024}],
    "auth": {"allow_anonymous": True, "anonymous_tier": "standard"}, "cache": {"enabled": False}}))
PY
ROOT=$(pwd)
for spec in ${TREES:-after=.}; do
  name=${spec%%=*}; tree=${spec#*=}
  cd "$ROOT/$tree"
  python3 -m proxy serve --config /tmp/gpu.yaml > "$OUT/serve-$name.log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 360); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
  for round in ${ROUNDS:-1}; do
    python3 -m loadtest.bench_stream --url http://127.0.0.1:18080 --pid $SERVER --model m135 --streams 256 \
      --duration ${DURATION:-20} --tokens 128 --out "$OUT/stream-$name-$round.json" | tr -d '\n'; echo
  done
  kill -TERM $SERVER; wait $SERVER
  cd "$ROOT"
done
