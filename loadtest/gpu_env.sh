# Sourced by the GPU scripts: the carried wheels (.gpu/wheels) on PYTHONPATH, unbuffered output,
# and the output folder ${OUT:-reports}.
OUT=${OUT:-reports}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-compile --root-user-action=ignore --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L

# served_run SHAPE OVERLAP_PREFILL TEMPERATURE DIR TAG JSONL [KEY=VALUE ...]: one `fullpower serve`
# run of gpu_scale.sh (one GPU, 256 streams from 8 clients, DURATION s, at most SERVED_TIMEOUT s)
# writing into DIR, its files renamed from <name>-SHAPE-1.* to <name>-SHAPE-TAG.*, then the run's
# figures and step anatomy appended to JSONL as one line with the KEY=VALUE fields (values read as
# JSON where they parse, else as strings) - kept as they come, so a cut run keeps the lines it made.
served_run() {
  local shape=$1 overlap=$2 temperature=$3 dir=$4 tag=$5 jsonl=$6
  shift 6
  OUT=$dir OVERLAP_PREFILL=$overlap TEMPERATURE=$temperature GPUS=1 CLIENTS_PER_GPU=8 DURATION=${DURATION:-12} \
    SHAPES=$shape timeout "${SERVED_TIMEOUT:-150}" bash loadtest/gpu_scale.sh
  pkill -f 'proxy serv[e]'; sleep 1
  for f in "$dir"/*-"$shape"-1.*; do [ -e "$f" ] && mv "$f" "${f%-1.*}-$tag.${f##*.}"; done
  python3 - "$dir" "$shape-$tag" "$@" >> "$jsonl" <<'PY'
import json, sys
d, name, fields = sys.argv[1], sys.argv[2], sys.argv[3:]
row = {}
for field in fields:
    key, _, value = field.partition("=")
    try:
        row[key] = json.loads(value)
    except ValueError:
        row[key] = value
for part in ("scale", "anatomy"):
    try:
        row[part] = json.load(open(f"{d}/{part}-{name}.json"))
    except (OSError, ValueError) as exc:
        row[part] = repr(exc)
print(json.dumps(row))
PY
}
