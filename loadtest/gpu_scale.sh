#!/usr/bin/env bash
# Several GPUs behind one proxy: `fullpower serve` with one worker per GPU (random weights in the
# 135M and 1B shapes), 256 streams per GPU, against the same proxy with one worker, in one lease.
# Reports delivered tok/s, TTFT and inter-token percentiles, the proxy's CPU per token and core
# share (loadtest.bench_stream, from CLIENTS_PER_GPU client processes per GPU), each GPU's busy
# fraction (nvidia-smi's utilization, sampled every 200 ms during the run), and each worker's
# engine-loop host time per decode step by part (loadtest.served_anatomy over two /metrics
# scrapes). GPUS defaults to every GPU nvidia-smi lists; SHAPES to both shapes; PREFILL_WAIT_MS
# sets the pool's prefill_wait_ms, OVERLAP_PREFILL (1 or 0) its overlap_prefill; TEMPERATURE the
# requests' temperature (default 0.7; 0 is greedy, as bench_gpu's engine-alone runs); DTYPE the
# pool's dtype (default auto), STREAM_INTERVAL its stream_interval (default 1); PROXY_PROFILE=1
# also samples the proxy with py-spy for 8 s of the run (proxy-profile-<shape>-<n>.txt, raw stacks);
# PIN_PROXY=1 runs the proxy alone on the first physical core (workers and clients on the others). Needs .gpu/
# as gpu_stream.sh does. Writes
# scale-<shape>-<n>.json, util-<shape>-<n>.csv and anatomy-<shape>-<n>.json into ${OUT:-reports}.
set -u
source loadtest/gpu_env.sh
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
for shape in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
  model=$(python3 -c "import sys; from loadtest.gpu_config import MODEL_DIRS; print(MODEL_DIRS[sys.argv[1]][1])" "$shape")
  for n in $(printf '%s\n' 1 "$GPUS" | sort -un); do  # one run when GPUS=1
    python3 -m loadtest.gpu_config --gpus "$n" --shape "$shape" --prefill-wait-ms "${PREFILL_WAIT_MS:-0}" --overlap-prefill "${OVERLAP_PREFILL:-1}" --dtype "${DTYPE:-auto}" --stream-interval "${STREAM_INTERVAL:-1}" --out /tmp/gpu$n.yaml
    python3 -m proxy serve --config /tmp/gpu$n.yaml > "$OUT/serve-$shape-$n.log" 2>&1 &
    SERVER=$!
    for i in $(seq 1 480); do
      ready=$(curl -sf -H "Authorization: Bearer $(cat /tmp/fpdata/admin.token 2>/dev/null)" http://127.0.0.1:19091/admin/pool \
        | python3 -c "import json,sys; print(sum(w['state']=='ready' for w in json.load(sys.stdin)['workers']))" 2>/dev/null)
      [ "${ready:-0}" = "$n" ] && break; sleep 0.5
    done
    nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 200 > "$OUT/util-$shape-$n.csv" &
    SMI=$!
    metrics() { curl -sf -H "Authorization: Bearer $(cat /tmp/fpdata/admin.token)" http://127.0.0.1:19091/metrics; }
    metrics > /tmp/metrics-before.txt
    CLIENT_CPUS=""
    if [ "${PIN_PROXY:-0}" = 1 ]; then
      # The proxy alone on the first physical core (its other hardware thread left idle); its workers
      # and the clients on the other cores, so that no busy neighbour shares the proxy's core.
      siblings=$(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)  # "0", "0,8", "0-1"
      rest=$(python3 -c "
import os, sys
core = set()
for part in sys.argv[1].split(','):
    a, _, b = part.partition('-')
    core.update(range(int(a), int(b or a) + 1))
print(','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c not in core))" "$siblings")
      taskset -a -p -c 0 $SERVER > /dev/null
      for w in $(pgrep -P $SERVER); do taskset -a -p -c "$rest" $w > /dev/null; done
      CLIENT_CPUS="taskset -c $rest"
      echo "proxy pinned to cpu 0 (its core: $siblings); workers and clients on $rest"
    fi
    if [ "${PROXY_PROFILE:-0}" = 1 ]; then  # py-spy samples the proxy for 8 s inside the run's window
      (sleep 4; /tmp/site/bin/py-spy record -p $SERVER -d 8 -r 250 -f raw --nonblocking -o "$OUT/proxy-profile-$shape-$n.txt" > /dev/null 2>&1) &
    fi
    $CLIENT_CPUS python3 -m loadtest.bench_stream --url http://127.0.0.1:18080 --pid $SERVER --model $model --streams $((256 * n)) \
      --clients $((${CLIENTS_PER_GPU:-3} * n)) --duration ${DURATION:-20} --tokens 128 --temperature ${TEMPERATURE:-0.7} --out "$OUT/scale-$shape-$n.json" | tr -d '\n'; echo
    kill $SMI
    metrics > /tmp/metrics-after.txt
    # each worker's engine-loop host time per decode step by part, over the run
    python3 -m loadtest.served_anatomy /tmp/metrics-before.txt /tmp/metrics-after.txt | tee "$OUT/anatomy-$shape-$n.json"
    python3 - "$OUT/util-$shape-$n.csv" <<'PY'
import collections, sys
busy = collections.defaultdict(list)
for line in open(sys.argv[1]):
    gpu, util = (x.strip() for x in line.split(","))
    busy[gpu].append(float(util))
# the middle of the run (the first and last 15% of samples are warm-up and drain)
print("gpu busy %:", {g: round(sum(v[len(v) * 15 // 100: len(v) * 85 // 100]) / max(1, len(v) * 70 // 100), 1) for g, v in sorted(busy.items())})
PY
    kill -TERM $SERVER; wait $SERVER
  done
done
