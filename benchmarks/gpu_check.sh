#!/usr/bin/env bash
# The one prepared device check for a lent GPU (H100/H200): every GPU row of issue 12 in <= 8 minutes.
# No internet and no ISBI data needed (synthetic data everywhere).
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh     # on the GPU; log + JSON in $OUT
#   QUICK=1 DEVICE=cpu bash benchmarks/gpu_check.sh       # the same rows with --quick settings (CPU smoke)
#
# benchmarks/gpu_check.py runs the rows (training batch 8 bf16: eager, compiled whole step in three modes, the
# model-only compile; forward batch 16 572x572 bf16: eager, compiled, CUDA graph; infer.py end to end on a
# 100-slice 512x512 stack vs forward-only; train.py --benchmark and a real run with checkpoints and validation;
# the checkpoint stall), each in its own process and time limit, rewriting $OUT/gpu_check.json after every row,
# and ends with the torch.profiler table of the top CUDA kernels of the fastest training row.
# Env: QUICK=1; DEVICE=auto|cuda|npu|cpu; BUDGET_S (420: the rows' budget; the whole script stays under
# BUDGET_S + 60); ROWS=comma list (default all); TORCHINDUCTOR_CACHE_DIR (default /tmp/unet-inductor-cache:
# a rerun on the same machine reuses the compiled graphs).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
DEVICE=${DEVICE:-auto}
BUDGET_S=${BUDGET_S:-420}
ROWS=${ROWS:-}
RESULTS=${OUT:-$(mktemp -d -t unet-gpu-check-XXXXXX)}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/unet-inductor-cache}
# Tiny --quick inputs with 2+ OpenMP threads on a busy CPU spend most of their time in thread barriers.
[[ "$QUICK" == 1 ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

main() {
  echo "### gpu_check $(date -Is)  QUICK=$QUICK DEVICE=$DEVICE BUDGET_S=$BUDGET_S results: $RESULTS"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  python -c "import torch; print(f'torch {torch.__version__}  cuda {torch.version.cuda}  cuda available: '
                                 f'{torch.cuda.is_available()}')"
  git log -1 --oneline 2>/dev/null || true
  local args=(--device "$DEVICE" --budget "$BUDGET_S" --out "$RESULTS")
  [[ "$QUICK" == 1 ]] && args+=(--quick)
  [[ -n "$ROWS" ]] && args+=(--rows "$ROWS")
  timeout --signal=TERM --kill-after=10 $((BUDGET_S + 60)) python benchmarks/gpu_check.py "${args[@]}"
  local rc=$?
  echo "### gpu_check.py exit $rc after ${SECONDS}s; results in $RESULTS/gpu_check.json"
  return $rc
}

if [[ -n "${OUT:-}" ]]; then
  main 2>&1 | tee "$OUT/gpu_check.log"
else
  main 2>&1
fi
