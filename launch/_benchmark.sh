# Performance run body shared by benchmark_1p.sh and benchmark_8p.sh (sourced after _common.sh):
# train.py --benchmark at batch 8 and 16 per device, then the inference throughput script.
cd "$REPO"
ROOT="${MODEL_DIR:-results/benchmark_${DEVICE}_${NPROC}p}"
STEPS="${STEPS:-$([ "$DEVICE" = cpu ] && echo 5 || echo 100)}"
WARMUP="${WARMUP:-$([ "$DEVICE" = cpu ] && echo 2 || echo 20)}"
for bs in 8 16; do
  launcher train.py "${DATA_ARGS[@]}" --benchmark --batch-size "$bs" --max-steps "$STEPS" \
    --warmup-steps "$WARMUP" --model-dir "$ROOT/batch$bs" "${MODEL_ARGS[@]}" "${EXTRA[@]}"
done
