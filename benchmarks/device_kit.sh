#!/usr/bin/env bash
# Prepares what benchmarks/gpu_trainer_bench.py needs on the lent GPU machine and prints the `run`
# command. That machine has python3 (3.12) with torch, transformers, peft and accelerate but nothing
# can be fetched there, and neither the venv nor ../shared travels: the missing wheels (pydantic for
# the API models, liger-kernel for fused linear cross-entropy, bitsandbytes for the QLoRA rows; ~47 MB
# of the 64 MiB `carry` allows) go in .whl/ and the shared calibration script in .calib/, both ignored
# by git and named in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv/bin/python
ver() { "$venv" -c "from importlib.metadata import version; print(version('$1'))"; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.calib/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
rm -rf .whl .calib && mkdir -p .whl .calib
pins=()
for p in pydantic pydantic-core annotated-types typing-inspection typing-extensions liger-kernel bitsandbytes; do pins+=("$p==$(ver "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
shared="${KUBETUNE_SHARED:-../shared}/calibration"
cp "$shared/measure.py" "$shared/h100-hf-trainer-peft.jsonl" .calib/
echo "wheels: $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1)); calibration: .calib/"
size=$(du -sm .whl .calib | awk '{s+=$1} END {print s}')
[ "$size" -le 60 ] || { echo "carry is ${size} MiB; run allows 64 MiB in all" >&2; exit 1; }
setup='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/operator/src:$PWD/trainer-image/src KUBETUNE_MEASURE_PY=$PWD/.calib/measure.py PYTHONUNBUFFERED=1 && set -o pipefail'
cat <<CMD
run with carry [".whl", ".calib"], one command each (<= 10 min):
1. check every run works on tiny dims first (about 2 min):
$setup && python3 benchmarks/gpu_trainer_bench.py --dry-run --all 2>&1 | tee \$OUT/dry.log
2. the target beside the plain stack, the memory levers (11 runs of 8B in all would pass the 10 minutes of one command):
$setup && python3 benchmarks/gpu_trainer_bench.py --variants default no-fused-kernels no-fused-ce no-expandable-segments 2>&1 | tee \$OUT/bench.log
2b. the speed levers on the target (rows in its own \$OUT/trainer_bench.jsonl):
$setup && python3 benchmarks/gpu_trainer_bench.py --no-baseline --variants no-fused-optim compile torch-chunked-ce mixed-no-packing mixed-packing 2>&1 | tee \$OUT/bench2.log
3. Liger's kernels without checkpointing, against the estimator's figure for them (about 3 min):
$setup && python3 benchmarks/gpu_trainer_bench.py --no-baseline --configs 1b-lora-b4s2048-gc --variants no-gc no-gc-no-fused-kernels 2>&1 | tee \$OUT/nogc.log
CMD
