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
python3 - <<'PY'
import json, torch
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
python3 -m proxy serve --config /tmp/gpu.yaml > "$OUT/serve.log" 2>&1 &
SERVER=$!
for i in $(seq 1 240); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
python3 -m loadtest --url http://127.0.0.1:18080 --admin-url http://127.0.0.1:19091 --model m135 --mode closed \
  --concurrency 256 --duration 20 --prompt-words 100-100 --max-tokens 128-128 --stream-share 1.0 \
  --out "$OUT" --name proxy-256 --no-plots --quiet 2>&1 | tail -8
kill -TERM $SERVER; wait $SERVER
tail -5 "$OUT/serve.log"
