#!/usr/bin/env bash
# Issue 14's GPU checks in one run, for a session lent a CUDA machine by the device tool.
#
# Here, once (what the GPU image lacks, as py3.12 wheels, and SmolLM2's config and
# tokenizer, into .gpu/, which git ignores):
#     bash bench/gpu_session.sh --prepare
# On the device machine, one call (about 6 minutes; JSON and logs come back from $OUT):
#     run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=590)
# A dry run on this CPU, tiny sizes, checks the script itself:
#     DEVICE=cpu OUT=/tmp/gpu_dry bash bench/gpu_session.sh
#
# Each step has its own time limit, so one that hangs cannot lose the others:
#   1. the CUDA and Triton tests (pytest -k "cuda or triton")
#   2. bench.gpu_train: saelab (both kernels timed on each shape) vs sparsify, the three
#      shapes of issue 14
#   3. bench.harvest on SmolLM2's architecture with random weights (the real weights, 94 MB
#      as GGUF, are more than a call carries; speed does not depend on the values)
#   4. bench.gpu_train --stream: 30 resid_post BatchTopK SAEs (4608, k 32) from one
#      forward, end to end
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
WHEELS="gguf==0.19.0 zstandard==0.25.0 eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1
multiprocess==0.70.19 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9
docstring-parser==0.18.0"
MODEL_FILES="config.json generation_config.json tokenizer.json tokenizer_config.json"

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  mkdir -p $GPU/whl $GPU/model
  plat=""
  for n in 28 27 17; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat --platform manylinux2014_x86_64 -d $GPU/whl $WHEELS || exit 1
  src=$(.venv/bin/python -c "from saelab.models.load import pull; print(pull('smollm2-135m-instruct'))")
  for f in $MODEL_FILES; do cp "$src/$f" $GPU/model/; done
  du -sh $GPU
  exit 0
fi

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=python3
[ -x .venv/bin/python ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python
if [ "$DEVICE" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $GPU/whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee "$OUT/versions.txt"
  SHAPES=default; TOKENS=2000000; STREAM_TOKENS=2000000; SITES='resid_post.*'; STEPS=50
  SPARSIFY_PY=$(command -v $PY); BUFFER=65536
else  # the dry run: the same steps, tiny
  export PYTHONPATH=$PWD
  SHAPES=tiny; TOKENS=8192; STREAM_TOKENS=8192; SITES='resid_post.0,resid_post.1'; STEPS=3
  SPARSIFY_PY=$PWD/bench/.venv-sparsify/bin/python; BUFFER=4096
fi
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc, $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$OUT/summary.txt"
}

step tests 150 $PY -m pytest -q -p no:cacheprovider -k "cuda or triton" \
  tests/test_triton_kernels.py tests/test_train_engine.py tests/test_harvest_engine.py
step gpu_train 180 $PY -m bench.gpu_train --device "$DEVICE" --shapes $SHAPES --steps $STEPS \
  --sparsify-python "$SPARSIFY_PY" --out "$OUT/gpu_train.json"

# SmolLM2's architecture with random weights, its real tokenizer
MODEL=/tmp/smollm2-random
$PY - "$GPU/model" "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
EOF

step harvest 120 $PY -m bench.harvest --model $MODEL --device "$DEVICE" --dtype bfloat16 \
  --tokens $TOKENS --store-dtype bfloat16 --out "$OUT/harvest.json"
step stream 200 $PY -m bench.gpu_train --stream --device "$DEVICE" --model $MODEL \
  --sites "$SITES" --tokens $STREAM_TOKENS --buffer-tokens $BUFFER --out "$OUT/stream.json"
cat "$OUT/summary.txt"
