#!/usr/bin/env bash
# The proxy's CPU per streamed token, this tree against an earlier one, on one GPU host (docs/benchmarks.md
# §5, seventh pass). BEFORE names the earlier tree - its source unpacked in a folder of this one, e.g.
#   mkdir -p .gpu/baseline && git archive <commit> proxy backend loadtest config pyproject.toml | tar -x -C .gpu/baseline
# (carried with .gpu/, whose wheels and tokenizer gpu_env.sh wants). First the 2-core machine's own benchmark
# (loadtest.bench_stream with the fake worker: no GPU) in both trees - what calibrates this host's CPU
# against the development machine - then ROUNDS (default 2) rounds of served 135M runs at STREAM_INTERVAL
# (default 16), alternating the trees. Results under ${OUT:-reports}/: fake/<tree>-<args>.json and
# <after|before>-r<round>/served-shapes-smollm2-135m.jsonl; one line per run on stdout.
set -u
AFTER=$PWD
BEFORE=$(cd "${BEFORE:?BEFORE=<folder of the earlier tree>}" && pwd)
source loadtest/gpu_env.sh > /dev/null  # the carried wheels; OUT
mkdir -p "$OUT/fake"
OUT=$(cd "$OUT" && pwd)  # the trees' runs write here from their own folders
[ -e "$BEFORE/.gpu" ] || ln -s "$AFTER/.gpu" "$BEFORE/.gpu"
for args in "--tokens 128" "--tokens 128 --stream-interval 16" "--tokens 16 --stream-interval 16"; do
  for side in before after; do
    tree=$BEFORE; [ $side = after ] && tree=$AFTER
    name=$side$(echo $args | tr -d ' -')
    (cd "$tree" && python3 -m loadtest.bench_stream --duration 10 $args --out "$OUT/fake/$name.json" > /dev/null 2>&1)
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], d['delivered_tok_s'], 'tok/s', d['proxy_cpu_us_per_token'], 'us/token', d['proxy_core_share'], 'of a core')" "$OUT/fake/$name.json" "fake $name"
  done
done
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in after before; do
    tree=$BEFORE; [ $side = after ] && tree=$AFTER
    (cd "$tree" && STREAM_INTERVAL=${STREAM_INTERVAL:-16} SHAPES=smollm2-135m ALONE=0 TEMPS=0 SERVED_TIMEOUT=140 \
      OUT="$OUT/$side-r$round" bash loadtest/gpu_shapes.sh 2>&1 | grep -E '^\{ *"streams"' \
      | python3 -c "import json, sys; d = json.loads(sys.stdin.read()); print('served $side-r$round', d['delivered_tok_s'], 'tok/s', d['proxy_cpu_us_per_token'], 'us/token', d['proxy_core_share'], 'of a core')")
  done
done
