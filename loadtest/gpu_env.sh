# Sourced by the GPU scripts: the carried wheels (.gpu/wheels) on PYTHONPATH, unbuffered output,
# and the output folder ${OUT:-reports}.
OUT=${OUT:-reports}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --no-compile --root-user-action=ignore --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi -L
