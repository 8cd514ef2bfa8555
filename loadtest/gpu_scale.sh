#!/usr/bin/env bash
# Several GPUs behind one proxy: `fullpower serve` with one worker per GPU (the 135M shape, random
# weights), 256 streams per GPU, against the same proxy with one worker, in one lease. Reports
# delivered tok/s and the proxy's CPU per token and core share (loadtest.bench_stream, from
# CLIENTS client processes). GPUS defaults to every GPU nvidia-smi lists. Needs .gpu/ as
# gpu_stream.sh does. Writes scale-*.json into ${OUT:-reports}.
set -u
OUT=${OUT:-reports}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-compile --root-user-action=ignore --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi -L
python3 -c "
from pathlib import Path
from loadtest.bench_gpu import build_model
build_model('smollm2-135m', Path('.gpu/tokenizer'), Path('/tmp/m135'))"
for n in 1 $GPUS; do
  python3 - "$n" <<'PY'
import json, sys
from pathlib import Path
n = int(sys.argv[1])
Path(f"/tmp/gpu{n}.yaml").write_text(json.dumps({
    "listen": "127.0.0.1:18080", "admin_listen": "127.0.0.1:19091", "data_dir": "/tmp/fpdata", "log_level": "warning",
    "pools": [{"name": "main", "model": "m135", "model_path": "/tmp/m135", "devices": [f"cuda:{i}" for i in range(n)],
               "replicas": {"hot": n}, "max_batch_size": 256, "max_inflight_per_worker": 512, "max_context": 512,
               "verify_manifest": False}],
    "tiers": [{"name": "standard", "pool": "main", "max_concurrent": 512 * n, "max_queue": 1024 * n}],
    "routing": {"slow_start_s": 0},
    "auth": {"allow_anonymous": True, "anonymous_tier": "standard"}, "cache": {"enabled": False}}))
PY
  python3 -m proxy serve --config /tmp/gpu$n.yaml > "$OUT/serve-$n.log" 2>&1 &
  SERVER=$!
  for i in $(seq 1 480); do
    ready=$(curl -sf -H "Authorization: Bearer $(cat /tmp/fpdata/admin.token 2>/dev/null)" http://127.0.0.1:19091/admin/pool \
      | python3 -c "import json,sys; print(sum(w['state']=='ready' for w in json.load(sys.stdin)['workers']))" 2>/dev/null)
    [ "${ready:-0}" = "$n" ] && break; sleep 0.5
  done
  python3 -m loadtest.bench_stream --url http://127.0.0.1:18080 --pid $SERVER --model m135 --streams $((256 * n)) \
    --clients $((${CLIENTS_PER_GPU:-3} * n)) --duration ${DURATION:-20} --tokens 128 --out "$OUT/scale-$n.json" | tr -d '\n'; echo
  kill -TERM $SERVER; wait $SERVER
done
