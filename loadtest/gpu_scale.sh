#!/usr/bin/env bash
# Several GPUs behind one proxy: `fullpower serve` with one worker per GPU (the 135M shape, random
# weights), 256 streams per GPU, against the same proxy with one worker, in one lease. Reports
# delivered tok/s and the proxy's CPU per token and core share (loadtest.bench_stream, from
# CLIENTS client processes). GPUS defaults to every GPU nvidia-smi lists. Needs .gpu/ as
# gpu_stream.sh does. Writes scale-*.json into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
for n in 1 $GPUS; do
  python3 -m loadtest.gpu_config --gpus "$n" --out /tmp/gpu$n.yaml
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
