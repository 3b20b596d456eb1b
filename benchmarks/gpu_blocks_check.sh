#!/usr/bin/env bash
# The prepared device check of issues 20 and 22 on a lent GPU, in one call of about 8 minutes (477 s on an H200
# host with 16 cores, 2026-12-04: step 1 about 4 minutes, step 2 about 4, most of it evaluate.py's CPU metrics):
#   1. issue 20's GPU rows: benchmarks/large_volume.py --parts throughput on 16 x 8192^2 (OME-Zarr and HDF5),
#      block-wise infer.py with --block-io auto (threads on a GPU) and inline, against forward-only on the same
#      tiles; the small model (tiles 1024, 8 per forward) and the reference model (572, 16 per forward);
#   2. issue 22's precision default on CUDA: evaluate.py and infer.py on ISBI fold 0 with a trained model,
#      --precision fp32 against the default (auto = bf16 on sm80+): metrics, mask pixels that differ, probabilities.
#
#   ISBI_DIR=... FOLD0_CKPT=... OUT=... bash benchmarks/gpu_blocks_check.sh
# ISBI_DIR: the ISBI 2012 folder; FOLD0_CKPT: a fold-0 checkpoint (the CPU recipe's: bash launch/train_1p.sh on a
# CPU); OUT: where the log and JSON files go. WHEELS: a folder of wheels to install first (zarr and its codecs,
# where the machine lacks them; pip cannot reach an index there). Step 2 is skipped without ISBI_DIR/FOLD0_CKPT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/unet-gpu-blocks}
SIZE_ARGS=${SIZE_ARGS:-}  # e.g. "--slices 2 --size 1024 --block 512 --chunks 256" for a CPU smoke run
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
echo "### gpu_blocks_check $(date -Is)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
nproc
python3 -c "import torch, zarr, h5py; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.is_available(), 'zarr', zarr.__version__, 'h5py', h5py.__version__)"
git log -1 --oneline 2>/dev/null || true

echo "### 1a. large volume, small model"
timeout 240 python3 benchmarks/large_volume.py --work "$WORK" --parts throughput --model small --tile 1024,8 \
  --block-io auto,inline --yardstick-s 5 $SIZE_ARGS --json "$OUT/lv_small.json"
echo "### 1b. large volume, reference model (volumes of 1a reused)"
timeout 240 python3 benchmarks/large_volume.py --work "$WORK" --parts throughput --model reference --tile 572,16 \
  --block-io auto,inline --yardstick-s 5 --reuse-volumes $SIZE_ARGS --json "$OUT/lv_reference.json"

if [[ -n "${ISBI_DIR:-}" && -n "${FOLD0_CKPT:-}" ]]; then
  echo "### 2. fp32 against the default precision on ISBI fold 0"
  for p in fp32 auto; do
    python3 evaluate.py --ckpt "$FOLD0_CKPT" --data-dir "$ISBI_DIR" --fold 0 --precision "$p" \
      --output "$OUT/eval_$p.json" | tail -n 4
    python3 infer.py --ckpt "$FOLD0_CKPT" --input "$ISBI_DIR/train-volume.tif" --output "$WORK/m_$p.tif" \
      --probabilities "$WORK/p_$p.tif" --precision "$p" --overwrite --no-progress | tail -n 3
  done
  python3 benchmarks/precision_agreement.py "$WORK/m_fp32.tif" "$WORK/p_fp32.tif" "$WORK/m_auto.tif" \
    "$WORK/p_auto.tif" "$OUT/eval_fp32.json" "$OUT/eval_auto.json" --json "$OUT/agreement.json"
fi
echo "### done after ${SECONDS}s"
} 2>&1 | tee "$OUT/gpu_blocks_check.log"
