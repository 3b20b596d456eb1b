#!/usr/bin/env bash
# One GPU session in one command: the throughput check (benchmarks/gpu_check.sh), then NVIDIA's accuracy
# recipe (reference model, batch 8, AMP) on one ISBI fold for as many of its 6400 steps as the time
# budget allows, then evaluate.py on that fold with and without --tta, and the export tests (ONNX too).
#
#   DATA_DIR=path/to/isbi2012 OUT=results/gpu TOTAL_S=560 bash benchmarks/gpu_reference_run.sh
#
# The step count actually run is printed and kept in the run's summary.json; nothing is extrapolated.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TOTAL_S=${TOTAL_S:-560}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the ISBI 2012 folder}
OUT=${OUT:?set OUT to a results folder}
FOLD=${FOLD:-0}
RUN=${RUN_DIR:-/tmp/unet_reference_fold$FOLD}   # checkpoints are ~400 MB: kept out of OUT
mkdir -p "$OUT"

echo "### throughput check"
BUDGET_S=${CHECK_S:-200} ROWS=${ROWS:-train_eager,train_py_benchmark,forward_eager,infer_end_to_end} \
  bash benchmarks/gpu_check.sh

ips=$(python -c "import json,sys; print(next(r['images_per_s'] for r in json.load(open(sys.argv[1]))['rows']
                                          if r['row'] == 'train_py_benchmark'))" \
        "$OUT/gpu_check.json" 2>/dev/null || echo 50)
left=$((TOTAL_S - SECONDS - 90))   # keep 90 s for validation, evaluation and the export tests
steps=$(python -c "print(max(100, min(6400, int($left * $ips * 0.85 / 8) // 100 * 100)))")
echo "### reference recipe, fold $FOLD: $steps of 6400 steps (measured $ips img/s, ${left}s left)"
python train.py --data-dir "$DATA_DIR" --fold "$FOLD" --amp --batch-size 8 --max-steps "$steps" \
  --evaluate-every $((steps / 4)) --save-every "$steps" --model-dir "$RUN" --overwrite --no-progress
cp "$RUN"/summary.json "$OUT/reference_fold${FOLD}_summary.json"
cp "$RUN"/metrics.jsonl "$OUT/reference_fold${FOLD}_metrics.jsonl"
cp "$RUN"/curves.png "$OUT/reference_fold${FOLD}_curves.png" 2>/dev/null

echo "### evaluate.py on fold $FOLD, without and with --tta"
python evaluate.py --ckpt "$RUN/best.pt" --amp --output "$OUT/reference_fold${FOLD}_eval.json"
python evaluate.py --ckpt "$RUN/best.pt" --amp --tta --output "$OUT/reference_fold${FOLD}_eval_tta.json"

echo "### export and device tests on this machine (ONNX where onnx/onnxscript are installed)"
python -m pytest -q tests/test_export.py tests/test_device.py -p no:cacheprovider
echo "### total ${SECONDS}s"
