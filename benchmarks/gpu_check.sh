#!/usr/bin/env bash
# One prepared device check for a lent GPU (H100/H200; no internet, no ISBI data: everything uses synthetic data).
#
#   bash benchmarks/gpu_check.sh            # on the GPU: about 3-5 minutes, hard cap ~7 minutes
#   QUICK=1 bash benchmarks/gpu_check.sh    # same commands with --quick settings (CPU smoke test)
#
# Runs, in order of importance (later steps are skipped once the time budget is spent):
#   1. train_throughput: reference model, batch 8, bf16 + fp16, eager, channels_last vs contiguous
#   2. inference_throughput: forward batch 1..16 bf16 + fp16, and infer.py end to end on 30 slices of 512x512
#   3. train.py --benchmark: reference model, batch 8, bf16 (with and without augmentation: loader cost)
#   4. train_throughput --compile on, bf16 (torch.compile takes a minute or so)
# Everything is echoed and, if $OUT is set, teed to $OUT/gpu_check.log with JSON results beside it.
# Env: QUICK=1 tiny settings; DEVICE=auto|cuda|npu|cpu; COMPILE=0|1 (default 1, 0 with QUICK); BUDGET_S (420).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
DEVICE=${DEVICE:-auto}
BUDGET_S=${BUDGET_S:-420}
if [[ "$QUICK" == 1 ]]; then COMPILE=${COMPILE:-0}; else COMPILE=${COMPILE:-1}; fi
RESULTS=${OUT:-$(mktemp -d -t unet-gpu-check-XXXXXX)}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$QUICK" == 1 ]]; then
  # Tiny inputs with 2+ OpenMP threads on a busy CPU spend most of their time in thread barriers (up to 60x).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  TRAIN_ARGS=(--quick)
  INFER_ARGS=(--quick)
  BENCH_ARGS=(--base-filters 16 --padding same --input-size 64 --batch-size 2 --max-steps 1 --warmup-steps 1
              --workers 0)
  STEP_TIMEOUT=300
else
  TRAIN_ARGS=(--models reference --batch-sizes 8 --warmup 20 --steps 50)
  INFER_ARGS=(--model reference --batch-sizes 1,2,4,8,16 --warmup 10 --iters 50 --slices 30)
  BENCH_ARGS=(--batch-size 8 --max-steps 50 --warmup-steps 20)
  STEP_TIMEOUT=150
fi

FAILED=()
step() {  # step NAME TIMEOUT CMD...: run one command with a time cap, record failures, keep going
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if (( left < 20 )); then echo "### SKIPPED $name: time budget ($BUDGET_S s) spent"; return; fi
  (( limit > left )) && limit=$left
  echo; echo "### $name (limit ${limit}s, elapsed ${SECONDS}s)"; echo "+ $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "### $name: exit $rc after $((SECONDS - t0))s"
  (( rc != 0 )) && FAILED+=("$name (exit $rc)")
  return 0
}

main() {
  echo "### gpu_check $(date -Is)  QUICK=$QUICK DEVICE=$DEVICE COMPILE=$COMPILE results: $RESULTS"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  python - <<'EOF'
import torch
print(f"torch {torch.__version__}  cuda {torch.version.cuda}  cuda available: {torch.cuda.is_available()}"
      + (f"  {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
EOF
  git log -1 --oneline 2>/dev/null || true

  step "train_throughput eager bf16/fp16 layouts" "$STEP_TIMEOUT" \
    python benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN_ARGS[@]}" --precisions bf16,fp16 \
      --compile off --layouts both --json "$RESULTS/train_throughput.json"
  step "inference_throughput bf16/fp16 + end to end" "$STEP_TIMEOUT" \
    python benchmarks/inference_throughput.py --device "$DEVICE" "${INFER_ARGS[@]}" --precisions bf16,fp16 \
      --json "$RESULTS/inference_throughput.json"
  step "train.py --benchmark bf16 (augment on)" "$STEP_TIMEOUT" \
    python train.py --benchmark --device "$DEVICE" --amp --amp-dtype bf16 "${BENCH_ARGS[@]}" --no-progress \
      --model-dir "$RESULTS/train_benchmark_augment"
  if [[ "$QUICK" != 1 ]]; then  # the same command as above with one flag more: not worth smoke-testing twice
    step "train.py --benchmark bf16 (augment off)" "$STEP_TIMEOUT" \
      python train.py --benchmark --device "$DEVICE" --amp --amp-dtype bf16 "${BENCH_ARGS[@]}" --no-progress \
        --no-augment --model-dir "$RESULTS/train_benchmark_noaugment"
  fi
  if [[ "$COMPILE" == 1 ]]; then
    step "train_throughput --compile on bf16" 240 \
      python benchmarks/train_throughput.py --device "$DEVICE" "${TRAIN_ARGS[@]}" --precisions bf16 \
        --compile on --json "$RESULTS/train_throughput_compile.json"
  fi

  echo
  echo "### done in ${SECONDS}s; results in $RESULTS"
  if (( ${#FAILED[@]} )); then printf '### FAILED: %s\n' "${FAILED[@]}"; return 1; fi
  echo "### all steps passed"
}

if [[ -n "${OUT:-}" ]]; then
  main 2>&1 | tee "$OUT/gpu_check.log"
else
  main 2>&1
fi
