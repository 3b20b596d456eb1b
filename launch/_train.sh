# Accuracy run body shared by train_1p.sh and train_8p.sh (sourced after _common.sh).
# NVIDIA's recipe is 6400 steps at batch 8 on one device; with N devices the global batch is 8N,
# so N-device runs take 6400/N steps to see the same number of images.
STEPS="${STEPS:-$((DEFAULT_STEPS / NPROC))}"
ROOT="${MODEL_DIR:-results/${DEVICE}_${NPROC}p}"
cd "$REPO"
if [ "$FOLD" = all ]; then FOLDS=(0 1 2 3 4); else FOLDS=("$FOLD"); fi
for k in "${FOLDS[@]}"; do
  launcher train.py "${DATA_ARGS[@]}" --fold "$k" --model-dir "$ROOT/fold$k" --max-steps "$STEPS" \
    --batch-size 8 "${MODEL_ARGS[@]}" "${EXTRA[@]}"
done
if [ "$FOLD" = all ]; then
  # Each checkpoint is evaluated on its own validation fold; prints per-fold rows and mean +- std.
  python evaluate.py --cv-dir "$ROOT" --output "$ROOT/cv.json"
fi
