#!/usr/bin/env bash
# Accuracy run on one device (NPU, GPU or CPU, picked automatically).
#   bash launch/train_1p.sh --data-dir ../shared/isbi2012 [--fold K|all] [--model-dir DIR] [train.py flags...]
# --fold all trains the five disjoint folds one after another and prints the cross-validation table.
# Accelerators: NVIDIA's recipe (reference model, AMP, batch 8, 6400 steps). CPU: the small model
# (the CPU recipe of docs/training.md: base 16, same padding, BatchNorm, 650 steps, under 5 minutes a fold on 2 cores).

NPROC=1
source "$(dirname "$0")/_common.sh"
source "$(dirname "$0")/_train.sh"
