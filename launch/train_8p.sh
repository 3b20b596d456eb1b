#!/usr/bin/env bash
# Accuracy run on N devices (default 8) with torchrun: one process per NPU/GPU (HCCL/NCCL), or CPU (gloo).
#   bash launch/train_8p.sh --data-dir ../shared/isbi2012 [--nproc N] [--fold K|all] [train.py flags...]
# Batch 8 per device (global 8N) for 6400/N steps: the same number of images as the 1-device recipe.

NPROC="${NPROC:-8}"
source "$(dirname "$0")/_common.sh"
source "$(dirname "$0")/_train.sh"
